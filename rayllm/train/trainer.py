"""The Ray Train `TorchTrainer` of a run, built one way for `rayllm train` and for sweep trials."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from rayllm.config import ConfigError
from rayllm.train.preflight import Preflight, capacity_text, describe, gib, preflight
from rayllm.train.run_store import RunStore
from rayllm.train.spec import run_spec


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
        # Each worker runs this read itself: its progress bars would be forwarded to the driver and
        # redrawn there for minutes (hundreds of thousands of lines, cutting rayllm's own step lines).
        datasets[split].context.enable_progress_bars = False
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[], execution_options=options)}


def build_trainer(cfg, pre: Preflight, run: RunStore, callbacks: Sequence[Any] = ()):
    """Workers, resources, checkpoint retention and failure restarts from the train section; every
    worker gets the run's RunSpec (spec.py). The run's name and storage path are its folder, so
    building it again resumes it (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayllm.train.worker import train_func

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_func,
        **ingest(t),
        train_loop_config={"spec": run_spec(cfg, pre, run)},  # Ray Train wants a dict
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            **run.ray_storage(),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_last),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks),
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )
