"""`report.html`: one self-contained page per training run, sweep or evaluation (plots embedded as
PNG data, no script, no network), built from the files the stage already wrote. `rayllm report
PATH` (re)builds it; training runs, sweeps and evaluations write it when they finish.

What a folder is, is read from what it holds: `result.json`/`metrics.jsonl` (a run), `summary.json`
+ `results.csv` (a sweep), `eval.json` (an evaluation).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

REPORT = "report.html"
_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#1d1d1f;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f3f5}td:first-child,th:first-child{text-align:left}pre{background:#f6f6f8;padding:10px;font-size:12px;overflow:auto}
.muted{color:#777;font-size:12px}img{max-width:100%}.stopped{color:#a33}"""


class ReportError(ValueError):
    """A folder that holds no run, sweep or evaluation."""


def build(path: str | Path) -> Path:
    """Write `report.html` into the run, sweep or evaluation folder `path`; returns its path."""
    folder = Path(path)
    if (folder / "summary.json").is_file() and (folder / "results.csv").is_file():
        title, body = _sweep(folder)
    elif (folder / "eval.json").is_file():
        title, body = _evaluation(folder)
    elif (folder / "metrics.jsonl").is_file() or (folder / "result.json").is_file():
        title, body = _run(folder)
    else:
        raise ReportError(f"{folder}: no run (metrics.jsonl / result.json), sweep (summary.json + results.csv) "
                          "or evaluation (eval.json) here")
    out = folder / REPORT
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                   f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}"
                   f"<p class='muted'>built from {html.escape(str(folder.resolve()))} by `rayllm report`</p></body></html>")
    return out


# -- pieces --------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[Any]], row_class: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(f"<tr class='{(row_class or [''] * len(rows))[i]}'>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _figure(panels: list[tuple[str, dict[str, dict[float, float]]]], xlabel: str = "step", logx: bool = False) -> str:
    """Small line plots side by side, as an embedded PNG: each panel is (title, {label: {x: y}})."""
    panels = [(t, series) for t, series in panels if any(series.values())]
    if not panels:
        return "<p class='muted'>nothing logged to plot</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series.items():
            if points:
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], "o-" if len(xs) < 30 else "-", markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f"<img alt='{html.escape(', '.join(t for t, _ in panels))}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _series(records: list[dict], key: str) -> dict[float, float]:
    return {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r}


# -- kinds ---------------------------------------------------------------------------------------
def _run(folder: Path) -> tuple[str, str]:
    records = _records(folder / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").is_file() else {}
    start = next((r for r in records if r.get("event") == "start"), {})
    facts = [["status", result.get("status", "running")], ["step", result.get("step", steps[-1]["step"] if steps else 0)],
             ["train loss", result.get("loss")], ["val loss", result.get("val_loss")], ["val perplexity", result.get("val_ppl")],
             ["tokens seen", result.get("tokens_seen")], ["rollbacks", result.get("rollbacks")],
             ["trainable / total params", f"{_fmt(result.get('trainable_params', start.get('trainable_params')))} / "
                                          f"{_fmt(result.get('total_params', start.get('total_params')))}"],
             ["dtype", result.get("dtype", start.get("dtype"))], ["CPU capability", start.get("cpu_capability")],
             ["workers", start.get("world")], ["output", result.get("adapter_dir") or result.get("model_dir")]]
    val_keys = sorted({k for r in evals for k in r if k.startswith("val_") and isinstance(r[k], (int, float))})
    body = ["<h2>Summary</h2>", _table(["", "value"], [f for f in facts if f[1] is not None]),
            "<h2>Curves</h2>",
            _figure([("loss", {"train": _series(steps, "loss"), "val": _series(evals, "val_loss")}),
                     ("learning rate", {"lr": _series(steps, "lr")}),
                     ("tokens/s", {"tokens/s": _series(steps, "tokens_per_s")}),
                     ("peak memory (GiB)", {"peak": _series(steps, "peak_mem_gib")})])]
    if any("reward_mean" in r for r in steps):
        body += ["<h2>GRPO</h2>", _grpo_figure(steps, evals)]
    if evals:
        body += ["<h2>Evaluations</h2>", _table(["step", *val_keys], [[e["step"], *(e.get(k) for k in val_keys)] for e in evals])]
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    if rollbacks:
        body += ["<h2>Loss-spike rollbacks</h2>", _table(["step", "restored step", "reason"],
                                                         [[r["step"], r.get("restored_step"), r.get("reason")] for r in rollbacks])]
    if (folder / "eval.json").is_file():
        body += ["<h2>rayllm eval</h2>", _eval_table(json.loads((folder / "eval.json").read_text()))]
    if (folder / "config.yaml").is_file():
        body += ["<h2>Config</h2>", f"<pre>{html.escape((folder / 'config.yaml').read_text())}</pre>"]
    return f"Training run {folder.name}", "".join(body)


def _grpo_figure(steps: list[dict], evals: list[dict]) -> str:
    """A GRPO run's iterations: reward per reward function (and held-out), KL, clip fraction, completion length."""
    names = sorted({k.split("/", 1)[1] for r in steps for k in r if k.startswith("reward/")})
    rewards = {"total": _series(steps, "reward_mean"), **{n: _series(steps, f"reward/{n}") for n in names},
               "held-out": _series(evals, "val_reward")}
    return _figure([("reward", rewards), ("KL", {"kl": _series(steps, "kl")}),
                    ("clip fraction", {"clipped": _series(steps, "clip_fraction")}),
                    ("completion length", {"tokens": _series(steps, "completion_length")})], xlabel="iteration")


def _sweep(folder: Path) -> tuple[str, str]:
    summary = json.loads((folder / "summary.json").read_text())
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    best = summary.get("best")
    classes = ["stopped" if r.get("stopped_early") == "True" else "" for r in rows]
    table_rows = [[("★ " if r.get("trial") == best else "") + str(r.get(h, "")) if h == "trial" else _num(r.get(h)) for h in header]
                  for r in rows]
    lr_key = "learning_rate" if "learning_rate" in header else None
    points = {float(r[lr_key]): float(r["best_val_loss"]) for r in rows
              if lr_key and r.get("best_val_loss") not in (None, "") and r.get(lr_key) not in (None, "")}
    curves = {}
    for r in rows:
        trial_records = _records(folder / "trials" / str(r.get("trial")) / "metrics.jsonl")
        curve = _series([x for x in trial_records if x.get("event") == "eval"], "val_loss")
        if curve:
            curves[f"lr {r.get(lr_key)}" if lr_key else str(r.get("trial"))] = curve
    facts = [[k, v] for k, v in summary.items() if isinstance(v, (str, int, float, bool)) and k not in ("results_csv", "plot")]
    body = ["<h2>Summary</h2>", _table(["", "value"], facts),
            "<h2>Trials</h2><p class='muted'>★ best trial; red rows were stopped early by ASHA</p>",
            _table(header, table_rows, classes),
            "<h2>Validation loss</h2>",
            _figure([("best val loss by learning rate", {"trials": points})], xlabel="learning rate", logx=True) if points else "",
            _figure([("val loss by step", curves)]) if curves else ""]
    return f"Sweep {folder.name}", "".join(body)


def _num(value: str | None) -> Any:
    try:
        return float(value) if value not in (None, "") and not str(value).isalpha() else value
    except ValueError:
        return value


def _eval_table(report: dict) -> str:
    figures = report.get("metrics", {})
    names: list[str] = []
    for per_target in figures.values():
        names += [m for m in per_target if m not in names]
    return _table(["metric", *figures], [[m, *(figures[t].get(m) for t in figures)] for m in names])


def _evaluation(folder: Path) -> tuple[str, str]:
    report = json.loads((folder / "eval.json").read_text())
    targets = [[t.get("label"), t.get("kind"), t.get("registry_ref") or t.get("source")] for t in report.get("targets", [])]
    body = ["<h2>Figures</h2>", _eval_table(report), "<h2>Targets</h2>", _table(["target", "kind", "source"], targets),
            f"<p class='muted'>created {html.escape(str(report.get('created_at', '')))}</p>"]
    return f"Evaluation {report.get('name', folder.name)}", "".join(body)
