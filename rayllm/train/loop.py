"""The per-worker training function Ray Train runs: build → (resume) → step, log, evaluate, save,
roll back on spikes → export. Read top to bottom; the pieces live in their own modules."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

from rayllm.train import checkpoint as ckpt
from rayllm.train import export
from rayllm.train.data import PackedSplit, StreamOrder, micro_slice
from rayllm.train.metrics import MetricsLog, device_peak_flops, flops_per_token, mfu, peak_memory_gib, plot_losses
from rayllm.train.run_store import RunStore
from rayllm.train.schedule import build_scheduler, rescale
from rayllm.train.spike import remember, spike_reason


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver (Ray Train's patched print
    would emit it twice once DeepSpeed has wrapped sys.stdout)."""
    sys.__stdout__.write(f"[rayllm] {message}\n")
    sys.__stdout__.flush()


def _all_sum(values, device):
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def worker_nodes() -> list[str]:
    """The Ray node ID of every rank, in rank order (where the run's workers were placed)."""
    import ray
    import torch.distributed as dist

    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def agreed_dtype(requested: str, use_gpu: bool, device) -> str:
    """`auto` → bf16 only if every worker's hardware runs it fast, so all ranks pick the same dtype."""
    import torch
    import torch.distributed as dist

    from rayllm.model import bf16_supported

    if requested != "auto":
        return requested
    flag = torch.tensor([1 if bf16_supported(use_gpu) else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return "bfloat16" if flag.item() else "float32"


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases; frozen weights left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]  # ZeRO-3 shards are flat
    return [
        {"params": [p for p, m in zip(params, matrix) if m], "weight_decay": weight_decay},
        {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0},
    ]


def make_model(model_cfg, train_cfg, tokenizer, base_dir: str | None, dtype: str, ds_config: dict, device=None):
    """The model, already sharded under ZeRO-3: while an HfDeepSpeedConfig is alive, transformers
    builds or loads it straight into shards (zero.Init). Without that every worker would first
    hold the whole model, which is what ZeRO-3 is there to avoid."""
    from rayllm.model import apply_lora, build_model, load_model

    if train_cfg.zero_stage == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        # Adopt the process group Ray Train set up: zero.Init needs the world size before initialize().
        deepspeed.init_distributed(dist_backend="nccl" if train_cfg.use_gpu else "gloo")
        make_model.hf_ds_config = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference
    if base_dir:
        model = load_model(base_dir, dtype, model_cfg.attn_implementation, model_cfg.quantization, device,
                           train_cfg.gradient_checkpointing)
    else:
        model = build_model(model_cfg, tokenizer, dtype, seed=train_cfg.seed)
    if train_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora is not None:
        model = apply_lora(model, model_cfg.lora)
    return model


def micro_loss(engine, batch: dict, device):
    """Summed next-token cross-entropy of one micro-batch (fp32). Causal LM: labels are aligned with
    the inputs, the shift is done here. Seq2seq: the decoder inputs are already the shifted labels."""
    import torch.nn.functional as F

    batch = {k: v.to(device) for k, v in batch.items()}
    if "decoder_input_ids" in batch:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=batch["decoder_input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    logits = engine(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")


def read_splits(ingest: str, dataset: str, seq_len: int, hf_config):
    """(train, val) as the model consumes them: packed rows, or encoder-decoder examples from them.
    The rows arrive through Ray Data (the trainer's datasets) or straight from the parquet files."""
    if ingest == "ray_data":
        import ray.train

        train, val = (PackedSplit.from_ray(ray.train.get_dataset_shard(s), seq_len, f"{dataset} {s}") for s in ("train", "val"))
    else:
        train, val = PackedSplit.read(dataset, "train"), PackedSplit.read(dataset, "val")
    if getattr(hf_config, "is_encoder_decoder", False):
        from rayllm.train.seq2seq import Seq2SeqSplit

        ids = hf_config.pad_token_id, hf_config.decoder_start_token_id
        return Seq2SeqSplit(train, *ids), Seq2SeqSplit(val, *ids)
    return train, val


def evaluate(engine, val: PackedSplit, n_micro: int, micro: int, rank: int, world: int, masking: bool, device) -> tuple[float, float]:
    """(val loss, perplexity), token-weighted over the first n_micro × micro × world val sequences."""
    import numpy as np
    import torch

    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for m in range(n_micro):
            rows = np.arange((m * world + rank) * micro, (m * world + rank + 1) * micro)
            total += micro_loss(engine, val.batch(rows, masking), device).item()
            count += val.target_tokens(rows, masking)
    engine.train()
    total, count = _all_sum([total, count], device)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))


def train_step(engine, split: PackedSplit, idx, b, rank: int, world: int, masking: bool, device, poison: bool = False) -> float:
    """One optimizer step over global batch `idx`: accumulation micro-batches on every rank, the loss
    normalised by the target tokens of the whole global batch (each rank can count them, all ranks
    hold the same data), so the gradient is the token mean however the tokens fall on ranks.
    `poison` makes the loss NaN (the spike test hook). Returns the global mean loss."""
    targets = max(split.target_tokens(idx, masking), 1)
    scale = b.gradient_accumulation_steps * world / targets  # DeepSpeed divides by both again
    loss_sum = 0.0
    for m in range(b.gradient_accumulation_steps):
        loss = micro_loss(engine, split.batch(micro_slice(idx, m, rank, world, b.micro_batch_size), masking), device)
        if poison:
            loss = loss * float("nan")
        engine.backward(loss * scale)
        engine.step()  # DeepSpeed steps the optimizer and the LR schedule only at the accumulation boundary
        loss_sum += loss.item()
    return _all_sum([loss_sum], device)[0] / targets


def roll_back(engine, scheduler, state: ckpt.TrainState, reason: str, spike_cfg, rank: int, strict: bool) -> tuple[ckpt.TrainState, dict]:
    """Restore the last checkpoint, lower the LR, and skip the data that led to the spike."""
    import ray.train

    good = ray.train.get_checkpoint()
    if good is None or state.rollbacks >= spike_cfg.max_rollbacks:
        why = "no checkpoint yet (lower train.save_every)" if good is None else f"{state.rollbacks} rollbacks already"
        raise RuntimeError(f"loss spike at step {state.step} ({reason}) and {why}")
    restored = ckpt.restore(engine, good, rank, strict=strict)
    rescale(scheduler, spike_cfg.lr_factor)
    event = {"event": "rollback", "step": state.step, "reason": reason, "restored_step": restored.step,
             "skipped_batches": state.cursor - restored.cursor}
    restored.cursor, restored.rollbacks = state.cursor, state.rollbacks + 1
    restored.lr_scale = state.lr_scale * spike_cfg.lr_factor
    return restored, {**event, "lr_scale": restored.lr_scale, "lr": scheduler.get_last_lr()[0]}


def train_func(config: dict) -> None:
    """Ray Train's train_loop_per_worker; `config` is built by `launch.loop_config`."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["train"]["use_gpu"] else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    import deepspeed
    import ray.train
    import torch

    from rayllm.config import ModelConfig, TrainConfig
    from rayllm.model import base_fingerprint, count_4bit_modules, count_trainable, load_tokenizer, lora_targets
    from rayllm.train.batching import Batching
    from rayllm.train.zero import deepspeed_config

    tcfg, mcfg = TrainConfig.model_validate(config["train"]), ModelConfig.model_validate(config["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if tcfg.use_gpu else torch.device("cpu")
    if tcfg.use_gpu:
        torch.cuda.set_device(device)
    store = RunStore.on_worker(config)
    run_dir, masking = store.local, tcfg.document_masking
    b = Batching(**config["batching"])

    dtype = agreed_dtype(mcfg.dtype, tcfg.use_gpu, device)
    nodes = worker_nodes()
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    ds_config = deepspeed_config(tcfg, b, dtype, config["planned_trainable_params"])
    model = make_model(mcfg, tcfg, tokenizer, config["base_dir"], dtype, ds_config, device)
    trainable, total_params = count_trainable(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, tcfg.weight_decay),
        config=ds_config, lr_scheduler=lambda opt: build_scheduler(tcfg, opt),
    )
    lora = mcfg.lora is not None
    hf_config = model.get_base_model().config if lora else model.config
    train, val = read_splits(tcfg.ingest, config["dataset"], b.seq_len, hf_config)
    order = StreamOrder(len(train), tcfg.seed)
    eval_micro = config["eval_micro_batches"]

    state = ckpt.TrainState()
    if (found := ray.train.get_checkpoint()) is not None:
        state = ckpt.restore(engine, found, rank, strict=not lora)
    if rank == 0 and found is not None:  # an object-store run resumes with the metrics in its bucket
        store.pull("metrics.jsonl")
    elif rank == 0:  # ...and starts without whatever a staging folder kept from an earlier run
        store.start_fresh()
    log = MetricsLog(run_dir, rank == 0, tcfg.report_to, config.get("wandb"), resume_step=state.step)
    log.log({"event": "start", "step": state.step, "dtype": dtype, "world": world, "trainable_params": trainable,
             "total_params": total_params, "quantized_modules": count_4bit_modules(model), "resumed": found is not None,
             "cpu_capability": config["cpu_capability"], "worker_nodes": nodes})
    if rank == 0:
        say(f"rank 0: {dtype}, {trainable:,}/{total_params:,} trainable params, start at step {state.step}, "
            f"{world} workers on {len(set(nodes))} node(s)")

    def save_hf_files(folder: Path) -> None:
        hf_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    stop = min(tcfg.stop_at_step or tcfg.max_steps, tcfg.max_steps)
    flops_token = flops_per_token(total_params, hf_config.num_hidden_layers, hf_config.hidden_size, b.seq_len)
    peak = device_peak_flops(tcfg.use_gpu)
    inject, fired = set(config.get("inject_spike_at", [])), set()
    last = {"val_loss": None, "val_ppl": None}
    t_log, tokens_since, paused = time.perf_counter(), 0, 0.0
    while state.step < stop:
        idx = order.global_batch(state.cursor, b.global_batch)
        poison = state.step + 1 in inject - fired
        fired |= {state.step + 1} if poison else set()
        step_loss = train_step(engine, train, idx, b, rank, world, masking, device, poison)
        state.step, state.cursor = state.step + 1, state.cursor + 1

        reason = spike_reason(step_loss, state.history, tcfg.spike.threshold, tcfg.spike.window) if tcfg.spike.enabled else None
        if reason:
            state, event = roll_back(engine, scheduler, state, reason, tcfg.spike, rank, strict=not lora)
            log.log(event)
            if rank == 0:
                say(f"spike at step {event['step']}: {reason}; back to step {state.step}, "
                    f"skipped {event['skipped_batches']} batches, LR × {state.lr_scale:g}")
            continue
        state.history = remember(state.history, step_loss, tcfg.spike.window)
        state.tokens_seen += b.tokens_per_step
        tokens_since += b.tokens_per_step

        if state.step % tcfg.logging_steps == 0 or state.step == stop:
            tps = tokens_since / max(time.perf_counter() - t_log - paused, 1e-9)  # evals and saves excluded
            record = {"step": state.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": engine.get_global_grad_norm(), "tokens_per_s": tps, "tokens_seen": state.tokens_seen,
                      "cursor": state.cursor, "batch_crc": zlib.crc32(getattr(train, "rows", train).input_ids[idx].tobytes()),
                      "peak_mem_gib": peak_memory_gib(tcfg.use_gpu)}
            if (u := mfu(tps, flops_token, peak, world)) is not None:
                record["mfu"] = u
            record = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
            log.log(record)
            if rank == 0:
                say(f"step {state.step}/{tcfg.max_steps} loss {step_loss:.4f} lr {record['lr']:.2e} {tps:,.0f} tok/s")
            t_log, tokens_since, paused = time.perf_counter(), 0, 0.0

        t_pause = time.perf_counter()
        do_save = state.step % tcfg.save_every == 0 or state.step == stop
        # Every report carries a fresh val loss: Tune's schedulers rank trials by it.
        do_eval = state.step % tcfg.eval_every == 0 or state.step == tcfg.max_steps or do_save
        if do_eval and eval_micro > 0:
            last["val_loss"], last["val_ppl"] = evaluate(engine, val, eval_micro, b.micro_batch_size, rank, world, masking, device)
            log.log({"event": "eval", "step": state.step, "val_loss": last["val_loss"], "val_ppl": last["val_ppl"]})
        if do_eval or do_save:
            metrics = {"step": state.step, "loss": step_loss, **{k: v for k, v in last.items() if v is not None}}
            if do_save:
                folder = ckpt.save(engine, state, rank, save_hf_files, exclude_frozen=lora)
                ckpt.report(metrics, folder, state.step)
                if rank == 0:
                    store.push("metrics.jsonl")
            else:
                ray.train.report(metrics)
        paused += time.perf_counter() - t_pause

    final = {"step": state.step, "loss": state.history[-1] if state.history else None, **last, "rollbacks": state.rollbacks,
             "tokens_seen": state.tokens_seen, "dtype": dtype}
    out = {"status": "stopped" if state.step < tcfg.max_steps else "finished", **final, "run_dir": store.location,
           "config_hash": config["config_hash"], "trainable_params": trainable, "total_params": total_params,
           "worker_nodes": nodes}
    if out["status"] == "finished":  # stopped early on purpose (stop_at_step): the checkpoint is the output
        if lora:
            fingerprint = config["base_fingerprint"] or base_fingerprint(hf_config, tokenizer)
            meta = export.adapter_meta(base_fingerprint=fingerprint, lora_cfg=mcfg.lora, config_hash=config["config_hash"],
                                       target_modules=lora_targets(mcfg.lora, hf_config.to_dict()),
                                       metrics=final, source_run=store.location, base_model=config["base_dir"])
            export.save_adapter(engine, run_dir / "adapter", meta)
            out["adapter_dir"] = store.where("adapter")
        else:
            export.save_model(engine, tokenizer, run_dir / "model")
            out["model_dir"] = store.where("model")
    if rank == 0:
        if (run_dir / "metrics.jsonl").exists():
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        (run_dir / "result.json").write_text(json.dumps(out, indent=2))
        # result.json last: on an object store its arrival says the run is complete
        store.push("metrics.jsonl", "loss_curve.png", "adapter", "model")
        store.push("result.json")
    log.close()
