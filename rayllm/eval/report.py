"""The evaluation's report: a side-by-side table (rich), eval.json and eval.csv under
`output_dir/name`, and each registry version's figures in its manifest (`eval.<name>`)."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayllm.eval.targets import Target

REPORT_JSON, REPORT_CSV = "eval.json", "eval.csv"


def metric_names(figures: dict[str, dict[str, float | None]]) -> list[str]:
    """Every metric any target has, in first-seen order (perplexity first, as the runs produce them)."""
    names: list[str] = []
    for per_target in figures.values():
        names += [m for m in per_target if m not in names]
    return names


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def table(figures: dict[str, dict], title: str):
    """A rich Table: one row per metric, one column per target."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    for label in figures:
        t.add_column(label, justify="right")
    for m in metric_names(figures):
        t.add_row(m, *(_cell(figures[label].get(m)) for label in figures))
    return t


def write(out_dir: Path, name: str, targets: list[Target], figures: dict[str, dict], details: dict) -> dict:
    """eval.json (figures, targets, task details) and eval.csv (metric × target); returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "targets": [{"label": t.label, "kind": t.kind, "source": t.source, "model_dir": t.model_dir, "adapter_dir": t.adapter_dir,
                     "registry_ref": t.registry_ref, **t.facts} for t in targets],
        "metrics": figures,
        **details,
    }
    tmp = out_dir / (REPORT_JSON + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out_dir / REPORT_JSON)
    with open(out_dir / REPORT_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", *figures])
        for m in metric_names(figures):
            w.writerow([m, *("" if figures[label].get(m) is None else figures[label][m] for label in figures)])
    return report


def record_in_registry(registry, targets: list[Target], figures: dict[str, dict], name: str, details: dict) -> list[str]:
    """Each registry version's figures into its manifest under eval.<name>; the refs written."""
    done = []
    for t in targets:
        if t.registry_ref is None:
            continue
        entry = {"metrics": figures[t.label], "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **details}
        registry.record(t.registry_ref, "eval", name, entry)
        done.append(t.registry_ref)
    return done
