"""Loss-spike policy (pure): what counts as a spike, and the history it is judged against.

A spike is a non-finite loss, or a loss above `threshold` × the median of the last `window` good
steps. The loop answers one by restoring the last checkpoint, multiplying the LR by `lr_factor` and
skipping the data between that checkpoint and the spike (the batches that led there), at most
`max_rollbacks` times. The decision uses the loss averaged over all workers, so every rank agrees.

Test hook: the environment variable RAYLLM_INJECT_SPIKE_AT_STEP=N (read by `launch.run` on the
driver) makes step N's loss NaN once, through the real backward pass, which poisons the weights
exactly as a real divergence would.
"""

from __future__ import annotations

import math
import statistics

INJECT_ENV = "RAYLLM_INJECT_SPIKE_AT_STEP"


def spike_reason(loss: float, history: list[float], threshold: float, window: int) -> str | None:
    """Why `loss` is a spike given the recent good losses, or None when it is not."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if len(history) >= window:
        median = statistics.median(history[-window:])
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
