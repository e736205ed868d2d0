"""Per-step metrics, written by rank 0 itself (a `ray.train.report` costs ~1.5 s, so Ray only hears
about evaluations and checkpoints): metrics.jsonl in the run directory, W&B (offline by default),
a loss-curve PNG at the end. Also the pure arithmetic: model FLOPs per token and MFU, and the
tokens/s meter of the step loop."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

# Dense bf16 peak of common accelerators, FLOP/s (MFU is reported only where the peak is known).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus the attention scores (PaLM, appendix B)."""
    return 6 * n_params + 12 * num_layers * hidden_size * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_flops: float | None, num_workers: int) -> float | None:
    """Model FLOPs utilisation of the whole group, or None where no peak is known (CPUs)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_token / (peak_flops * num_workers)


def device_peak_flops(use_gpu: bool) -> float | None:
    if not use_gpu:
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gib(use_gpu: bool) -> float:
    """Peak memory of this worker: allocated GPU memory, or the process's peak RSS on CPU."""
    if use_gpu:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class Throughput:
    """Training tokens per second since the last restart, with the time spent in `paused()` blocks
    (evaluations, checkpoint saves) left out, so the figure measures the steps alone."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens, self.paused_s = time.perf_counter(), 0, 0.0

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start - self.paused_s, 1e-9)


class MetricsLog:
    """Rank 0's sink: appends JSON lines and mirrors them to W&B when asked; a no-op elsewhere."""

    def __init__(self, run_dir: Path, active: bool, report_to: list[str], wandb_kwargs: dict | None = None, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.active = active
        self.wandb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if "wandb" in report_to and wandb_kwargs:
            import wandb

            self.wandb = wandb.init(dir=str(run_dir), resume="allow", **wandb_kwargs)

    def _truncate_after(self, step: int) -> None:
        """A resumed run restarts at its checkpoint: drop what the crashed attempt logged after it."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb.log(numeric, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Training and validation loss against step, as a PNG; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in records if "loss" in r and math.isfinite(r["loss"])}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    rollbacks = [r["step"] for r in records if r.get("event") == "rollback"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), label="train loss")
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="val loss")
    for step in rollbacks:
        ax.axvline(step, color="red", linestyle=":", label="rollback" if step == rollbacks[0] else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
