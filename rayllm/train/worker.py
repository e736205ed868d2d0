"""One training worker from start to end, as Ray Train runs it: `train_func` is setup → steps → finish.

`setup` builds what the step loop holds (a `Run`: the DeepSpeed engine and LR schedule, the data,
the run store, the metrics log) and the state to start from (the latest checkpoint's, or step 0);
`loop.run_steps` trains; `finish` exports the adapter or model and writes result.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rayllm.train import checkpoint as ckpt
from rayllm.train import export
from rayllm.train.data import PackedSplit, StreamOrder, read_splits
from rayllm.train.loop import micro_loss, run_steps, say
from rayllm.train.metrics import MetricsLog, device_peak_flops, flops_per_token, plot_losses
from rayllm.train.run_store import RunStore
from rayllm.train.spec import RunSpec


def train_func(config: dict) -> None:
    """Ray Train's train_loop_per_worker; `config["spec"]` is the RunSpec built on the driver (spec.py)."""
    spec: RunSpec = config["spec"]
    run, state = setup(spec)
    if spec.train.objective == "grpo":  # online RL: rollouts and updates instead of a fixed data stream
        from rayllm.train.grpo import run_iterations

        state, last_eval = run_iterations(run, state)
    else:
        state, last_eval = run_steps(run, state)
    finish(run, state, last_eval)


@dataclass
class Run:
    """What one worker holds for the whole run."""

    spec: RunSpec
    rank: int
    world: int
    device: Any
    nodes: list[str]  # the Ray node ID of every rank
    dtype: str  # the same on every rank
    store: RunStore
    log: MetricsLog
    tokenizer: Any
    hf_config: Any  # the base model's under LoRA
    engine: Any  # DeepSpeed's engine around the model
    scheduler: Any
    # ZeRO-3 only: transformers keeps just a weak reference to its HfDeepSpeedConfig and asks it whether
    # ZeRO-3 is on whenever it creates, loads or saves weights; holding it here keeps it alive for the run.
    hf_ds_config: Any
    train: PackedSplit  # or Seq2SeqSplit, dpo.PreferenceSplit (same interface)
    val: PackedSplit
    order: StreamOrder
    loss_fn: Callable  # loop.micro_loss or the dpo.Dpo objective, or the spike test hook around it
    trainable_params: int
    total_params: int
    flops_per_token: float
    peak_flops: float | None  # None where unknown (CPUs): no MFU
    objective: Any = None  # dpo.Dpo: its reward figures join the step, eval and result records
    keep_alive: Any = None  # a DPO full fine-tune's reference under ZeRO-3: its HfDeepSpeedConfig

    @property
    def lora(self) -> bool:
        return self.spec.model.lora is not None

    def save_hf_files(self, folder: Path) -> None:
        """config.json and the tokenizer beside a checkpoint, so it converts to an HF folder alone."""
        self.hf_config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def setup(spec: RunSpec) -> tuple[Run, ckpt.TrainState]:
    """Device and dtype, model and DeepSpeed engine, data, the state to start from; logs the start."""
    t, m = spec.train, spec.model
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")  # read when deepspeed is imported
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", spec.torch_extensions_dir)
    if not t.use_gpu:
        skip_shm_comm_build()
    import ray.train
    import torch

    from rayllm.model import count_4bit_modules, count_trainable, load_tokenizer
    from rayllm.train.spike import nan_loss_at

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cores = bind_cores(ctx.get_local_rank(), ctx.get_local_world_size()) if t.bind_cores and not t.use_gpu else None
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if t.use_gpu:
        torch.cuda.set_device(device)
    dtype = agreed_dtype(m.dtype, t.use_gpu, device)
    nodes = worker_nodes()
    tokenizer = load_tokenizer(spec.tokenizer_dir)
    model, engine, scheduler, hf_ds_config = build_engine(spec, tokenizer, dtype, device)
    trainable, total = count_trainable(model)
    hf_config = model.get_base_model().config if m.lora is not None else model.config
    train, val = read_splits(t.ingest, spec.dataset, spec.batching.seq_len, hf_config)
    objective = keep_alive = None
    if t.objective == "dpo":
        from rayllm.train import dpo

        objective, train, val, keep_alive = dpo.setup(spec, engine, train, val, tokenizer, dtype, device, rank, world,
                                                      spec.eval_micro_batches)
    elif t.objective == "grpo":
        from rayllm.train import grpo

        objective, train, val = grpo.setup(spec, train, val, tokenizer, rank)
    store = RunStore.on_worker(spec.run_dir, spec.run_uri)
    state, resumed = resume(engine, store, rank, strict=m.lora is None)
    loss_fn = objective or micro_loss
    if spec.inject_spike_at:  # test hook (spike.INJECT_ENV): NaN losses at those steps, through the real backward
        loss_fn = nan_loss_at(loss_fn, spec.inject_spike_at, spec.batching.gradient_accumulation_steps)
    run = Run(spec=spec, rank=rank, world=world, device=device, nodes=nodes, dtype=dtype, store=store,
              log=MetricsLog(store.local, rank == 0, t.report_to, spec.wandb, resume_step=state.step),
              tokenizer=tokenizer, hf_config=hf_config, engine=engine, scheduler=scheduler, hf_ds_config=hf_ds_config,
              train=train, val=val, order=StreamOrder(len(train), t.seed), loss_fn=loss_fn, objective=objective, keep_alive=keep_alive,
              trainable_params=trainable, total_params=total, peak_flops=device_peak_flops(t.use_gpu),
              flops_per_token=flops_per_token(total, hf_config.num_hidden_layers, hf_config.hidden_size, spec.batching.seq_len))
    run.log.log({"event": "start", "step": state.step, "dtype": dtype, "world": world, "trainable_params": trainable,
                 "total_params": total, "quantized_modules": count_4bit_modules(model), "resumed": resumed,
                 "cpu_capability": spec.cpu_capability, "worker_nodes": nodes, "cores": cores})
    if rank == 0:
        say(f"rank 0: {dtype}, {trainable:,}/{total:,} trainable params, start at step {state.step}, "
            f"{world} workers on {len(set(nodes))} node(s)")
    return run, state


def core_share(cores: list[int], local_rank: int, local_world: int) -> list[int] | None:
    """The cores of `local_rank` when `local_world` ranks on one node split `cores` evenly (contiguous
    runs, sizes differing by at most one); None when there is nothing to split (one rank, or fewer
    cores than ranks: binding would put two ranks on one core)."""
    if local_world <= 1 or len(cores) < local_world:
        return None
    return cores[local_rank * len(cores) // local_world: (local_rank + 1) * len(cores) // local_world]


SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU comm backend from compiling its shared-memory all-reduce op.

    On the CPU accelerator `deepspeed.init_distributed` JIT-builds `deepspeed_shm_comm` (two C++ files)
    whenever it is not built for this interpreter's DeepSpeed path yet: 65 s on a 2-core machine, on
    every fresh machine and every moved virtualenv, before the first step. Only
    `inference_all_reduce` (tensor-parallel inference) uses that op; ZeRO training reduces through
    torch.distributed (gloo). DeepSpeed has no setting for it, so the op is marked incompatible in
    `deepspeed.ops.__compatible_ops__`, which its `build_shm_op` checks before building."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    except Exception:  # noqa: BLE001 - another DeepSpeed: it builds the op as before
        pass


def bind_cores(local_rank: int, local_world: int) -> list[int] | None:
    """Pin the calling thread (the rank's compute thread; threads it starts afterwards inherit the
    binding) to its share of the cores this process may use (`core_share`), and return them. Threads
    that already run stay where they are: Ray's and gloo's, which mostly wait. Why: in a Ray worker the
    compute thread shares the node with Ray's service threads and daemons, which wake often; pinned, it
    stays on one core with its cache instead of following them around (+2 % tokens/s in 400-step A/B
    runs of 2 ranks on 2 cores: 10,606 / 10,642 against 10,290-10,451)."""
    share = core_share(sorted(os.sched_getaffinity(0)), local_rank, local_world)
    if share is not None:
        os.sched_setaffinity(0, share)
    return share


def agreed_dtype(requested: str, use_gpu: bool, device) -> str:
    """rayllm.dtypes.resolve_dtype with one answer on every rank: `auto` is bf16 only if every
    worker's hardware runs it fast. Explicit names pass as given (preflight checked them)."""
    import torch
    import torch.distributed as dist

    from rayllm.dtypes import bf16_supported, resolve_dtype

    if requested != "auto":
        return requested
    flag = torch.tensor([1 if bf16_supported(use_gpu) else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return resolve_dtype(requested, use_gpu, bf16_ok=bool(flag.item()))


def worker_nodes() -> list[str]:
    """The Ray node ID of every rank, in rank order (where the run's workers were placed)."""
    import ray
    import torch.distributed as dist

    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def build_engine(spec: RunSpec, tokenizer, dtype: str, device):
    """(model, DeepSpeed engine, LR scheduler, HfDeepSpeedConfig or None). The optimizer is the one
    `deepspeed_config` names, built by DeepSpeed over `param_groups`; the schedule goes to DeepSpeed
    too, so its state is in every checkpoint."""
    import deepspeed

    from rayllm.train.schedule import build_scheduler
    from rayllm.train.zero import deepspeed_config

    t = spec.train
    ds_config = deepspeed_config(t, spec.batching, dtype, spec.planned_trainable_params)
    model, hf_ds_config = make_model(spec.model, t, tokenizer, spec.base_dir, dtype, ds_config, device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t.weight_decay),
        config=ds_config, lr_scheduler=lambda opt: build_scheduler(t, opt),
    )
    return model, engine, scheduler, hf_ds_config


def make_model(model_cfg, train_cfg, tokenizer, base_dir: str | None, dtype: str, ds_config: dict, device=None):
    """(model, HfDeepSpeedConfig or None): under ZeRO-3 the model is built or loaded straight into
    shards (zero.Init) while that HfDeepSpeedConfig is alive; without it every worker would first
    hold the whole model, which is what ZeRO-3 is there to avoid. The caller keeps it alive."""
    from rayllm.model import apply_lora, build_model, load_model

    hf_ds_config = None
    if train_cfg.zero_stage == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        # Adopt the process group Ray Train set up: zero.Init needs the world size before initialize().
        deepspeed.init_distributed(dist_backend="nccl" if train_cfg.use_gpu else "gloo")
        hf_ds_config = HfDeepSpeedConfig(ds_config)
    if base_dir:
        model = load_model(base_dir, dtype, model_cfg.attn_implementation, model_cfg.quantization, device,
                           train_cfg.gradient_checkpointing)
    else:
        model = build_model(model_cfg, tokenizer, dtype, seed=train_cfg.seed)
    if train_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora is not None:
        model = apply_lora(model, model_cfg.lora)
    return model, hf_ds_config


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases; frozen weights left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]  # ZeRO-3 shards are flat
    return [
        {"params": [p for p, m in zip(params, matrix) if m], "weight_decay": weight_decay},
        {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0},
    ]


def resume(engine, store: RunStore, rank: int, strict: bool) -> tuple[ckpt.TrainState, bool]:
    """(state to start from, resumed?): the run's latest checkpoint, which Ray Train hands a restarted
    or rerun run, else step 0."""
    import ray.train

    found = ray.train.get_checkpoint()
    state = ckpt.restore(engine, found, rank, strict=strict) if found is not None else ckpt.TrainState()
    if rank == 0 and found is not None:  # an object-store run resumes with the metrics in its bucket
        store.pull("metrics.jsonl")
    elif rank == 0:  # ...and starts without whatever a staging folder kept from an earlier run
        store.start_fresh()
    return state, found is not None


def finish(run: Run, state: ckpt.TrainState, last_eval: dict) -> None:
    """A finished run exports its adapter or model (collective); one stopped early on purpose
    (stop_at_step) has its checkpoint as output. Rank 0 then writes result.json."""
    final = {"step": state.step, "loss": state.history[-1] if state.history else None,
             **(run.objective.last_train if run.objective else {}), **last_eval,
             "rollbacks": state.rollbacks, "tokens_seen": state.tokens_seen, "dtype": run.dtype}
    out = {"status": "stopped" if state.step < run.spec.train.max_steps else "finished", **final,
           "run_dir": run.store.location, "config_hash": run.spec.config_hash, "trainable_params": run.trainable_params,
           "total_params": run.total_params, "worker_nodes": run.nodes}
    if out["status"] == "finished":
        out.update(export_output(run, final))
    if run.rank == 0:
        write_result(run.store, out)
    run.log.close()


def export_output(run: Run, metrics: dict) -> dict:
    """Save the LoRA adapter (with the metadata serving checks) or the whole model; where it went."""
    from rayllm.model import base_fingerprint, lora_targets

    spec, lora_cfg = run.spec, run.spec.model.lora
    if lora_cfg is None:
        export.save_model(run.engine, run.tokenizer, run.store.local / "model")
        return {"model_dir": run.store.where("model")}
    meta = export.adapter_meta(base_fingerprint=spec.base_fingerprint or base_fingerprint(run.hf_config, run.tokenizer),
                               lora_cfg=lora_cfg, config_hash=spec.config_hash,
                               target_modules=lora_targets(lora_cfg, run.hf_config.to_dict()),
                               metrics=metrics, source_run=run.store.location, base_model=spec.base_dir)
    export.save_adapter(run.engine, run.store.local / "adapter", meta)
    return {"adapter_dir": run.store.where("adapter")}


def write_result(store: RunStore, out: dict) -> None:
    """Rank 0: the loss curve and result.json, pushed to an object-store run's URI."""
    run_dir = store.local
    if (run_dir / "metrics.jsonl").exists():
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    (run_dir / "result.json").write_text(json.dumps(out, indent=2))
    # result.json last: on an object store its arrival says the run is complete
    write_report(run_dir)
    store.push("metrics.jsonl", "loss_curve.png", "report.html", "adapter", "model")
    store.push("result.json")


def write_report(run_dir: Path) -> None:
    """report.html beside result.json; a page that cannot be drawn is said, never fails the run."""
    from rayllm.report import build

    try:
        build(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's own outputs are already written
        say(f"report.html not written: {exc}")
