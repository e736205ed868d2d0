"""`registry.gate:` — the promotion gate: a version is measured through the live endpoint before an alias moves to it."""

from __future__ import annotations

from pydantic import Field

from rayllm.config.base import Section


class GateConfig(Section):
    endpoint: str | None = Field(None, description="Base URL of the OpenAI-compatible endpoint serving this registry (e.g. http://127.0.0.1:8000); the candidate is measured there as NAME@vN. Empty: no gate, so `registry promote` and a sweep's promote_alias need an explicit skip (--skip-gate, tune.promote_skip_gate).")
    api_key_env: str = Field("RAYLLM_API_KEY", description="Environment variable holding the endpoint's API key (unset or empty: no key sent).")
    tolerance: float = Field(0.01, gt=0, lt=1, description="Largest relative difference between the served validation perplexity and the trainer's own figure in the version's manifest.")
    dataset: str | None = Field(None, description="Prepared dataset whose val split is measured; empty: the one the version was trained on (its run's config.yaml, else train.dataset of this config).")
    max_sequences: int | None = Field(None, ge=1, description="Cap on the val sequences measured; empty: exactly the ones the trainer's val_loss covers (a like-for-like figure). A lower cap is faster but adds sampling noise: widen tolerance with it.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of each request to the endpoint (an unreachable endpoint fails within this, not forever).")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once while measuring.")
