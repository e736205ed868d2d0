"""Loss-spike policy (pure): what counts as a spike, and the history it is judged against.

A spike is a non-finite loss, or a loss above `threshold` × the median of the last `window` good
steps. The loop answers one by restoring the last checkpoint, multiplying the LR by `lr_factor` and
skipping the data between that checkpoint and the spike (the batches that led there), at most
`max_rollbacks` times. The decision uses the loss averaged over all workers, so every rank agrees.

Test hook: the environment variable RAYLLM_INJECT_SPIKE_AT_STEP=N (read on the driver into the
run's spec) makes step N's loss NaN once, through the real backward pass, which poisons the weights
exactly as a real divergence would. The worker wraps its loss function with `nan_loss_at` once at
setup; the step loop never sees the hook.
"""

from __future__ import annotations

import math
import statistics

INJECT_ENV = "RAYLLM_INJECT_SPIKE_AT_STEP"


def spike_reason(loss: float, history: list[float], threshold: float, window: int, floor: float = 0.0) -> str | None:
    """Why `loss` is a spike given the recent good losses, or None when it is not. `floor` is the
    least the median counts as: a loss that converges to 0 (DPO's) would otherwise turn noise near 0
    into "spikes" (0.37 after a median of 0.09 is no divergence; DPO's loss starts at ln 2)."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if len(history) >= window:
        median = max(statistics.median(history[-window:]), floor)
        if loss > threshold * median:
            return f"loss {loss:.4f} > {threshold} × running median {median:.4f}"
    return None


def remember(history: list[float], loss: float, window: int) -> list[float]:
    """The history after a good step (only the last `window` losses are kept)."""
    return (history + [loss])[-window:]


def injected_steps(value: str | None) -> set[int]:
    """Steps named by the test hook's comma-separated value."""
    if not value:
        return set()
    return {int(v) for v in value.split(",") if v.strip()}


def nan_loss_at(loss_fn, steps: set[int], micro_batches: int):
    """The test hook: `loss_fn(engine, batch, device)` whose losses are NaN for every micro-batch of
    each step in `steps` (1-based optimizer steps), the first time that step runs; the step a
    rollback replays trains normally. The step is read from DeepSpeed's optimizer-step counter,
    which a checkpoint restore rewinds with the weights."""
    left = dict.fromkeys(steps, micro_batches)

    def poisoned(engine, batch, device):
        loss = loss_fn(engine, batch, device)
        step = engine.global_steps + 1  # the step these micro-batches belong to
        if left.get(step, 0) > 0:
            left[step] -= 1
            return loss * float("nan")
        return loss

    return poisoned
