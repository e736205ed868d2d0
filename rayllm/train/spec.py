"""What every training worker receives: one frozen, typed `RunSpec`, built once on the driver.

The config sections travel as the validated pydantic objects themselves (they pickle), so a worker
reads `spec.train.learning_rate` exactly as the driver validated it: nothing is dumped to plain data
and validated a second time. Ray Train hands workers a dict, so the spec rides in it under one key:
`train_loop_config={"spec": spec}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayllm.config import ModelConfig, TrainConfig, config_hash
from rayllm.train.batching import Batching
from rayllm.train.spike import INJECT_ENV, injected_steps

if TYPE_CHECKING:
    from rayllm.config import RayllmConfig
    from rayllm.train.preflight import Preflight
    from rayllm.train.run_store import RunStore

# Where DeepSpeed builds and caches its C++ ops on each node (set before deepspeed is imported).
TORCH_EXTENSIONS_DIR = str(Path.home() / ".cache" / "rayllm" / "torch_extensions")


@dataclass(frozen=True)
class RunSpec:
    train: TrainConfig
    model: ModelConfig
    batching: Batching
    dataset: str  # absolute: workers run in other working directories
    tokenizer_dir: str
    base_dir: str | None  # HF folder of the pretrained base (GGUF already converted); None: a new model
    base_fingerprint: str | None  # of base_dir, computed once on the driver; None: computed from the new model
    run_dir: str  # rank 0's working folder: the run folder, or the staging folder of an object-store run
    run_uri: str | None  # the run's object-store URI; None on a disk
    eval_micro_batches: int  # per worker, already capped by the val split
    planned_trainable_params: int  # sizes DeepSpeed's buckets before the model exists
    config_hash: str  # written to result.json: a rerun of a finished run with the same hash is a no-op
    cpu_capability: str  # the driver's, logged beside each worker's dtype
    torch_extensions_dir: str = TORCH_EXTENSIONS_DIR
    wandb: dict[str, Any] | None = None  # wandb.init arguments; None: no W&B
    inject_spike_at: frozenset[int] = field(default_factory=frozenset)  # test hook (spike.INJECT_ENV)


def wandb_settings(cfg: RayllmConfig) -> dict[str, Any] | None:
    """wandb.init arguments of a run that reports to W&B, else None."""
    t = cfg.train
    if "wandb" not in t.report_to or t.wandb_mode == "disabled":
        return None
    return {"project": t.wandb_project, "group": t.wandb_group, "name": t.run_name, "mode": t.wandb_mode,
            "config": cfg.model_dump(mode="json", include={"model", "train"})}


def run_spec(cfg: RayllmConfig, pre: Preflight, run: RunStore) -> RunSpec:
    """The spec of a run that passed preflight, with its run store; reads the spike test hook from the
    driver's environment, so a test sets it where it calls `rayllm train`."""
    from rayllm.model import base_fingerprint

    dataset = Path(cfg.train.dataset).resolve()
    return RunSpec(
        train=cfg.train, model=cfg.model, batching=pre.batching,
        dataset=str(dataset), tokenizer_dir=str(dataset / pre.manifest.get("tokenizer", "tokenizer")),
        base_dir=pre.base_dir, base_fingerprint=base_fingerprint(pre.base_dir) if pre.base_dir else None,
        run_dir=str(run.local), run_uri=run.uri,
        eval_micro_batches=pre.eval_micro_batches, planned_trainable_params=pre.shape.trainable_params,
        config_hash=config_hash(cfg), cpu_capability=pre.cpu_capability,
        wandb=wandb_settings(cfg), inject_spike_at=frozenset(injected_steps(os.environ.get(INJECT_ENV))),
    )
