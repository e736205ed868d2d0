"""`registry:` — where versioned adapters are published and resolved."""

from __future__ import annotations

from pydantic import Field

from rayllm.config.base import Section
from rayllm.config.gate import GateConfig


class RegistryConfig(Section):
    path: str = Field("runs/registry", description="Registry root: a local directory or any fsspec URI (s3://bucket/prefix).")
    cache_dir: str = Field("runs/registry-cache", description="Local folder where serving keeps verified copies of versions from a remote (s3://) root, unless serve.stage_dir is set (vLLM loads local folders).")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate: measure a version through the live endpoint before an alias moves to it.")
