"""A sweep's results as a table (printed and CSV) and a plot of validation loss per trial."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TrialRow:
    trial: str
    learning_rate: float
    warmup_steps: int | None
    lora_rank: int | None
    best_val_loss: float | None
    final_val_loss: float | None
    perplexity: float | None
    steps: int
    tokens: int
    wall_s: float
    stopped_early: bool
    status: str
    adapter_dir: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list, repr=False)
    eval: dict[str, float] = field(default_factory=dict, repr=False)  # `rayllm eval` figures (tune.evaluate)
    dpo_beta: float | None = None
    score: float | None = None  # the trial's best tune.metric (val_loss unless a DPO sweep says otherwise)


COLUMNS = ["trial", "learning_rate", "warmup_steps", "lora_rank", "dpo_beta", "best_val_loss", "final_val_loss", "perplexity",
           "steps", "tokens", "wall_s", "stopped_early", "status", "adapter_dir"]


def eval_columns(rows: list[TrialRow]) -> list[str]:
    """`eval_<metric>` for every metric any trial was evaluated on, in first-seen order."""
    return [f"eval_{m}" for m in dict.fromkeys(m for r in rows for m in r.eval)]


def _value(r: TrialRow, column: str):
    return r.eval.get(column[5:]) if column.startswith("eval_") else getattr(r, column)


def best_trial(rows: list[TrialRow], mode: str = "min") -> TrialRow | None:
    """The best `score` (tune.metric: lowest for a loss, highest for DPO's accuracy or margin; a row without
    one falls back on its best val loss) among the trials that finished (only they have an adapter)."""
    done = [r for r in rows if r.status == "finished" and _score(r) is not None]
    if not done:
        return None
    return min(done, key=_score) if mode == "min" else max(done, key=_score)


def _score(r: TrialRow) -> float | None:
    return r.score if r.score is not None else r.best_val_loss


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[TrialRow], best: TrialRow | None, metric: str = "val_loss") -> str:
    shown = [c for c in COLUMNS if c != "adapter_dir" and (c != "dpo_beta" or any(r.dpo_beta is not None for r in rows))]
    shown += eval_columns(rows)
    cells = [[_fmt(_value(r, c)) + (" *" if r is best and c == "trial" else "") for c in shown] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if best:
        by = "" if best.score is None or best.score == best.best_val_loss else f", {metric} {best.score:.4f}"
        lines.append(f"* best: {best.trial} (lr {best.learning_rate:.3g}, val loss {best.best_val_loss:.4f}{by})" if best.best_val_loss is not None
                     else f"* best: {best.trial} (lr {best.learning_rate:.3g}{by})")
    return "\n".join(lines)


def write_csv(rows: list[TrialRow], path: Path) -> None:
    extra = eval_columns(rows)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + extra)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: v for k, v in asdict(r).items() if k in COLUMNS}, **{c: _value(r, c) for c in extra}})


def plot(rows: list[TrialRow], best: TrialRow | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r.curve:
            continue
        steps, losses = zip(*r.curve)
        is_best = r is best
        ax.plot(steps, losses, marker="o", linewidth=2.5 if is_best else 1.2,
                label=f"lr {r.learning_rate:.2g}" + (" (best)" if is_best else "") + (" stopped" if r.stopped_early else ""))
        if is_best:
            i = min(range(len(losses)), key=losses.__getitem__)
            ax.scatter([steps[i]], [losses[i]], s=160, marker="*", color="gold", edgecolor="black", zorder=5)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Learning-rate sweep")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
