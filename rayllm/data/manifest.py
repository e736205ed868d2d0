"""The prepared dataset's manifest.json and the summary table printed after `prepare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(dataset_dir: str | Path) -> dict[str, Any] | None:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(dataset_dir: str | Path, manifest: dict[str, Any]) -> None:
    path = Path(dataset_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def summary_table(m: dict[str, Any]) -> str:
    """A plain-text summary of a manifest, for people."""
    lines = [
        f"prepared dataset: {m['output_dir']}  (mode {m['mode']}, seq_len {m['seq_len']}, config {m['config_hash']})",
        f"  input files            {m['input_files']:>12,}",
        f"  rows in                {m['rows_in']:>12,}",
        f"  rows rejected          {m['rows_rejected']:>12,}  ({m['reject_fraction']:.2%}; limit {m['max_reject_fraction']:.2%})",
    ]
    for reason, n in sorted(m["rejects"].items()):
        lines.append(f"    {reason:<20} {n:>12,}")
    lines += [
        f"  duplicates removed     {m['duplicates_removed']:>12,}",
        f"  documents kept         {m['documents']:>12,}",
        *([f"  preference pairs       {m['pairs']:>12,}  (one per row: chosen and rejected)"] if "pairs" in m else []),
        "",
        f"  {'split':<8}{'documents':>12}{'sequences':>12}{'tokens':>14}{'pad tokens':>12}",
    ]
    for name, s in m["splits"].items():
        lines.append(f"  {name:<8}{s['documents']:>12,}{s['sequences']:>12,}{s['tokens']:>14,}{s['pad_tokens']:>12,}")
    lines.append(f"  tokenizer: {m['tokenizer_path']}  (vocab {m['vocab_size']:,}, {m['tokenizer_source']})")
    if m.get("rejects_file"):
        lines.append(f"  rejected samples: {m['rejects_file']}")
    return "\n".join(lines)
