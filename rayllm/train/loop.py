"""The step loop of a training worker: optimizer steps, loss-spike rollbacks, per-step metrics,
evaluations and checkpoints. `run_steps` reads top to bottom; what it holds (a `worker.Run`) was
built by `worker.setup`, and `worker.finish` exports what it leaves."""

from __future__ import annotations

import math
import sys
import zlib
from typing import TYPE_CHECKING

from rayllm.train import checkpoint as ckpt
from rayllm.train.data import PackedSplit, micro_slice
from rayllm.train.metrics import Throughput, mfu, peak_memory_gib
from rayllm.train.schedule import rescale
from rayllm.train.spike import remember, spike_reason

if TYPE_CHECKING:
    from rayllm.train.worker import Run


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver (Ray Train's patched print
    would emit it twice once DeepSpeed has wrapped sys.stdout)."""
    sys.__stdout__.write(f"[rayllm] {message}\n")
    sys.__stdout__.flush()


def all_sum(values, device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


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


def train_step(engine, split: PackedSplit, idx, b, rank: int, world: int, masking: bool, device, loss_fn=micro_loss) -> float:
    """One optimizer step over global batch `idx`: accumulation micro-batches on every rank, the loss
    normalised by the target tokens of the whole global batch (each rank can count them, all ranks
    hold the same data), so the gradient is the token mean however the tokens fall on ranks.
    Returns the global mean loss."""
    targets = max(split.target_tokens(idx, masking), 1)
    scale = b.gradient_accumulation_steps * world / targets  # DeepSpeed divides by both again
    loss_sum = 0.0
    for m in range(b.gradient_accumulation_steps):
        loss = loss_fn(engine, split.batch(micro_slice(idx, m, rank, world, b.micro_batch_size), masking), device)
        engine.backward(loss * scale)
        engine.step()  # DeepSpeed steps the optimizer and the LR schedule only at the accumulation boundary
        loss_sum += loss.item()
    return all_sum([loss_sum], device)[0] / targets


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
    total, count = all_sum([total, count], device)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))


def run_steps(run: Run, state: ckpt.TrainState) -> tuple[ckpt.TrainState, dict]:
    """Optimizer steps from `state` up to train.max_steps (or stop_at_step). A loss spike rolls back
    to the last checkpoint; a good step is logged, evaluated and saved on schedule. Returns the final
    state and the last evaluation ({"val_loss", "val_ppl"}, None before the first)."""
    t, b = run.spec.train, run.spec.batching
    stop = min(t.stop_at_step or t.max_steps, t.max_steps)
    last_eval = {"val_loss": None, "val_ppl": None}
    speed = Throughput()
    while state.step < stop:
        idx = run.order.global_batch(state.cursor, b.global_batch)
        loss = train_step(run.engine, run.train, idx, b, run.rank, run.world, t.document_masking, run.device, run.loss_fn)
        state.step, state.cursor = state.step + 1, state.cursor + 1

        floor = run.objective.spike_floor if run.objective is not None else 0.0
        reason = spike_reason(loss, state.history, t.spike.threshold, t.spike.window, floor) if t.spike.enabled else None
        if reason:
            state = roll_back(run, state, reason)
            continue
        state.history = remember(state.history, loss, t.spike.window)
        state.tokens_seen += b.tokens_per_step
        speed.count(b.tokens_per_step)

        if state.step % t.logging_steps == 0 or state.step == stop:
            log_step(run, state, loss, idx, speed.rate())
            speed.restart()
        with speed.paused():  # evaluations and saves are not training time
            last_eval = maybe_eval_and_save(run, state, loss, last_eval, stop)
    return state, last_eval


def roll_back(run: Run, state: ckpt.TrainState, reason: str) -> ckpt.TrainState:
    """Restore the last checkpoint, lower the LR, and skip the data that led to the spike."""
    import ray.train

    spike = run.spec.train.spike
    good = ray.train.get_checkpoint()
    if good is None or state.rollbacks >= spike.max_rollbacks:
        why = "no checkpoint yet (lower train.save_every)" if good is None else f"{state.rollbacks} rollbacks already"
        raise RuntimeError(f"loss spike at step {state.step} ({reason}) and {why}")
    restored = ckpt.restore(run.engine, good, run.rank, strict=not run.lora)
    rescale(run.scheduler, spike.lr_factor)
    skipped = state.cursor - restored.cursor
    restored.cursor, restored.rollbacks = state.cursor, state.rollbacks + 1
    restored.lr_scale = state.lr_scale * spike.lr_factor
    run.log.log({"event": "rollback", "step": state.step, "reason": reason, "restored_step": restored.step,
                 "skipped_batches": skipped, "lr_scale": restored.lr_scale, "lr": run.scheduler.get_last_lr()[0]})
    if run.rank == 0:
        say(f"spike at step {state.step}: {reason}; back to step {restored.step}, skipped {skipped} batches, "
            f"LR × {restored.lr_scale:g}")
    return restored


def log_step(run: Run, state: ckpt.TrainState, loss: float, idx, tokens_per_s: float) -> None:
    """One metrics record (rank 0 writes it) and one console line."""
    t = run.spec.train
    record = {"step": state.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
              "grad_norm": run.engine.get_global_grad_norm(), "tokens_per_s": tokens_per_s, "tokens_seen": state.tokens_seen,
              "cursor": state.cursor, "batch_crc": zlib.crc32(getattr(run.train, "rows", run.train).input_ids[idx].tobytes()),
              "peak_mem_gib": peak_memory_gib(t.use_gpu)}
    if (u := mfu(tokens_per_s, run.flops_per_token, run.peak_flops, run.world)) is not None:
        record["mfu"] = u
    if run.objective is not None:  # DPO: the reward figures since the last logged step
        record.update(run.objective.step_metrics(run.device))
    record = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
    run.log.log(record)
    if run.rank == 0:
        say(f"step {state.step}/{t.max_steps} loss {loss:.4f} lr {record['lr']:.2e} {tokens_per_s:,.0f} tok/s")


def maybe_eval_and_save(run: Run, state: ckpt.TrainState, loss: float, last_eval: dict, stop: int) -> dict:
    """Evaluate, checkpoint and report to Ray when the schedule says so; returns the last evaluation."""
    import ray.train

    t = run.spec.train
    do_save = state.step % t.save_every == 0 or state.step == stop
    # Every report carries a fresh val loss: Tune's schedulers rank trials by it.
    do_eval = state.step % t.eval_every == 0 or state.step == t.max_steps or do_save
    if do_eval and run.spec.eval_micro_batches > 0:
        if run.objective is not None:  # DPO: val loss and reward figures
            last_eval = run.objective.evaluate(run.engine, run.val, run.spec.eval_micro_batches, run.spec.batching.micro_batch_size,
                                               run.rank, run.world, run.device)
        else:
            val_loss, val_ppl = evaluate(run.engine, run.val, run.spec.eval_micro_batches, run.spec.batching.micro_batch_size,
                                         run.rank, run.world, t.document_masking, run.device)
            last_eval = {"val_loss": val_loss, "val_ppl": val_ppl}
        run.log.log({"event": "eval", "step": state.step, **last_eval})
    if not (do_eval or do_save):
        return last_eval
    metrics = {"step": state.step, "loss": loss, **{k: v for k, v in last_eval.items() if v is not None}}
    if do_save:
        folder = ckpt.save(run.engine, state, run.rank, run.save_hf_files, exclude_frozen=run.lora)
        ckpt.report(metrics, folder, state.step)
        if run.rank == 0:
            run.store.push("metrics.jsonl")
    else:
        ray.train.report(metrics)
    return last_eval
