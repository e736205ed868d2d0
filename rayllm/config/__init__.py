"""One typed schema for all of rayllm's configuration, loaded from YAML.

Each section lives in its own module; `RayllmConfig` composes them. Loading reports every
error at once (`ConfigError`), each naming the key path, the bad value and what would be valid.
"""

from __future__ import annotations

from pydantic import Field

from rayllm.config.base import Section
from rayllm.config.data import DataConfig, TokenizerConfig
from rayllm.config.eval import EvalConfig
from rayllm.config.load import ConfigError, config_hash, load_config, parse_config
from rayllm.config.model import LoraConfig, ModelConfig
from rayllm.config.registry import RegistryConfig
from rayllm.config.serve import ServeConfig
from rayllm.config.train import TrainConfig
from rayllm.config.tune import LearningRateSpace, TuneConfig


class RayllmConfig(Section):
    storage: str | None = Field(None, description="Root every relative artifact path (data.output_dir, data.tokenizer.path, model.path, train.dataset, train.output_dir, tune.output_dir, eval.dataset, eval.output_dir, registry.path, registry.cache_dir, serve.model, serve.stage_dir, serve.state_dir, serve.adapters folders) is resolved against: a directory every node of the cluster sees (also RAYLLM_STORAGE); empty: the working directory. An object-store URI (s3://bucket/prefix) holds run dirs (train.output_dir) and the registry; the other keys then need absolute paths on a shared disk.")
    data: DataConfig | None = Field(None, description="Data preparation (`rayllm prepare`).")
    model: ModelConfig | None = Field(None, description="The model trained or fine-tuned (`rayllm train`).")
    train: TrainConfig | None = Field(None, description="Training run (`rayllm train`).")
    tune: TuneConfig | None = Field(None, description="Learning-rate sweep (`rayllm sweep`).")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Adapter registry.")
    serve: ServeConfig | None = Field(None, description="Serving (`rayllm serve`).")
    eval: EvalConfig | None = Field(None, description="Evaluation (`rayllm eval`).")


__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LearningRateSpace",
    "LoraConfig",
    "ModelConfig",
    "RayllmConfig",
    "RegistryConfig",
    "ServeConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TuneConfig",
    "config_hash",
    "load_config",
    "parse_config",
]
