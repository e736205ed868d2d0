"""The Ray Train `TorchTrainer` of a run, built one way for `rayllm train` and for sweep trials."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import yaml

from rayllm.config import ConfigError, config_hash
from rayllm.train.preflight import Preflight, capacity_text, describe, gib, preflight
from rayllm.train.run_store import RunStore
from rayllm.train.spike import INJECT_ENV, injected_steps

TORCH_EXTENSIONS_DIR = str(Path.home() / ".cache" / "rayllm" / "torch_extensions")


def prepare_run(cfg, address: str | None = None, dry: bool = False) -> tuple[Preflight, RunStore]:
    """Preflight (config rules, dataset, base model, memory plan) before any Ray resource; then the
    run folder (or URI) with the resolved config. Returns (preflight, run store)."""
    pre = preflight(cfg, address)
    if not pre.fits:
        need = gib(pre.plan.per_worker(pre.settings.use_gpu))
        raise ConfigError("config", [f"train: the plan needs {need} per worker, more than there is ({capacity_text(pre)}); "
                                     f"{describe(pre, cfg).splitlines()[-1]}; `rayllm plan` shows the breakdown"])
    run = RunStore(cfg.train.output_dir, cfg.train.run_name)
    if not dry:
        run.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return pre, run


def loop_config(cfg, pre: Preflight, run: RunStore) -> dict:
    """What every worker receives: validated sections as plain data, paths, derived numbers."""
    from rayllm.model import base_fingerprint

    t = cfg.train
    dataset = Path(t.dataset).resolve()
    wandb = None
    if "wandb" in t.report_to and t.wandb_mode != "disabled":
        wandb = {"project": t.wandb_project, "group": t.wandb_group, "name": t.run_name, "mode": t.wandb_mode,
                 "config": cfg.model_dump(mode="json", include={"model", "train"})}
    return {
        "train": t.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
        "dataset": str(dataset), "tokenizer_dir": str(dataset / pre.manifest.get("tokenizer", "tokenizer")),
        "base_dir": pre.base_dir, "base_fingerprint": base_fingerprint(pre.base_dir) if pre.base_dir else None,
        "run_dir": str(run.local), "run_uri": run.uri, "batching": asdict(pre.batching), "eval_micro_batches": pre.eval_micro_batches,
        "planned_trainable_params": pre.shape.trainable_params,
        "config_hash": config_hash(cfg), "cpu_capability": pre.cpu_capability, "torch_extensions_dir": TORCH_EXTENSIONS_DIR,
        "wandb": wandb, "inject_spike_at": sorted(injected_steps(os.environ.get(INJECT_ENV))),
    }


# Ray Data read tasks reserve no CPU: they run once, before the first step, while the workers wait
# for them; any reservation could wait forever when the workers hold every CPU of their nodes.
READ_TASK_CPUS = 0


def _read_shards(batch, columns: list[str]):
    """One Ray Data task: the parquet shards named in `batch` as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables(pq.read_table(path, columns=columns) for path in batch["path"].to_pylist())


def ingest(train_cfg) -> dict:
    """TorchTrainer `datasets` and `dataset_config` for `train.ingest: ray_data`: each split read by
    Ray Data tasks, a shard per task in file order, and handed to every worker whole, order
    preserved (see train/data.py). Not `read_parquet`: its file-listing task asks for a whole CPU,
    which no node has free when the workers hold their nodes' CPUs (the ingest would wait forever)."""
    if train_cfg.ingest != "ray_data":
        return {}
    import ray.data
    from ray.train import DataConfig

    from rayllm.train.data import COLUMNS, shard_files

    dataset = Path(train_cfg.dataset).resolve()  # read tasks run in other processes, other working dirs
    datasets = {}
    for split in ("train", "val"):
        files = [str(f) for f in shard_files(dataset, split)]
        datasets[split] = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
            _read_shards, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": list(COLUMNS)}, num_cpus=READ_TASK_CPUS)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[], execution_options=options)}


def build_trainer(cfg, pre: Preflight, run: RunStore, callbacks: Sequence[Any] = ()):
    """Workers, resources, checkpoint retention and failure restarts from the train section. The
    run's name and storage path are its folder, so building it again resumes it (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayllm.train.loop import train_func

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_func,
        **ingest(t),
        train_loop_config=loop_config(cfg, pre, run),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            **run.ray_storage(),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_last),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks),
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )
