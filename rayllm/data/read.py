"""Inputs → Ray datasets of cleaned documents, one row per input record.

Every input row becomes exactly one output row — kept or rejected — so the manifest can account
for all of them: `content` (the cleaned document), `hash`, `split`, `reject` ("" when kept),
`detail` and `raw` (a truncated copy of rejected input, for rejects.jsonl).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from rayllm.config.data import DataConfig
from rayllm.data.clean import Cleaned, clean_pretrain, clean_sft, content_hash, parse_json_line, split_of, split_paragraphs
from rayllm.storage import is_uri

COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz", ".lz4")
RAW_SAMPLE_CHARS = 500


def detect_format(path: str) -> str:
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve_inputs(inputs: list[str]) -> list[str]:
    """Paths, directories and globs (local or any fsspec URI) → a sorted list of files; the name
    `botchan` stands for the public-domain novel that setup installs (rayllm.data.corpora)."""
    import fsspec

    files: list[str] = []
    for spec in inputs:
        if spec == "botchan":
            from rayllm.data.corpora import botchan_path

            spec = str(botchan_path())
        fs, path = fsspec.core.url_to_fs(spec)
        if any(c in path for c in "*?["):
            matches = fs.glob(path)
        elif fs.isdir(path):
            matches = fs.find(path)
        elif fs.exists(path):
            matches = [path]
        else:
            raise FileNotFoundError(f"data.inputs: {spec!r} matches no file")
        matches = [m for m in sorted(matches) if not m.rsplit("/", 1)[-1].startswith(".") and fs.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"data.inputs: {spec!r} matches no file")
        files += [fs.unstrip_protocol(m) if is_uri(spec) else m for m in matches]
    return sorted(dict.fromkeys(files))


def input_fingerprint(files: list[str]) -> str:
    """Changes when any input file is added, removed, resized or modified."""
    import hashlib

    import fsspec

    h = hashlib.sha256()
    for f in files:
        fs, path = fsspec.core.url_to_fs(f)
        info = fs.info(path)
        h.update(f"{f}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('last_modified')}\n".encode())
    return h.hexdigest()[:16]


def _rows(cleaned: list[Cleaned], raws: list[str], cfg: DataConfig) -> dict[str, np.ndarray]:
    hashes = [content_hash(c.content) if not c.reject else "" for c in cleaned]
    return {
        "content": np.array([c.content for c in cleaned], dtype=object),
        "hash": np.array(hashes, dtype=object),
        "split": np.array([split_of(h, cfg.val_fraction, cfg.split_salt) if h else "" for h in hashes], dtype=object),
        "reject": np.array([c.reject for c in cleaned], dtype=object),
        "detail": np.array([c.detail for c in cleaned], dtype=object),
        "raw": np.array([r[:RAW_SAMPLE_CHARS] if c.reject else "" for c, r in zip(cleaned, raws)], dtype=object),
    }


def _clean_record(record: Any, cfg: DataConfig) -> Cleaned:
    if cfg.mode == "preference":
        from rayllm.data.preference import clean_preference

        return clean_preference(record, cfg)
    return clean_sft(record, cfg) if cfg.mode == "sft" else clean_pretrain(record, cfg)


def clean_json_lines(batch: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    lines = [str(x) for x in batch["text"]]
    cleaned = []
    for line in lines:
        record, problem = parse_json_line(line)
        cleaned.append(Cleaned(reject="invalid_json", detail=problem) if problem else _clean_record(record, cfg))
    return _rows(cleaned, lines, cfg)


def clean_records(batch, cfg: DataConfig) -> dict[str, np.ndarray]:
    records = batch.to_pylist()
    return _rows([_clean_record(r, cfg) for r in records], [json.dumps(r, default=str) for r in records], cfg)


def clean_text_files(batch: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    units: list[str] = []
    for blob in batch["bytes"]:
        text = bytes(blob).decode("utf-8", errors="replace")
        if cfg.text_unit == "file":
            units.append(text)
        elif cfg.text_unit == "line":
            units += [line for line in text.splitlines() if line.strip()]
        else:
            units += split_paragraphs(text)
    if cfg.mode != "pretrain":
        cleaned = [Cleaned(reject="wrong_type", detail=f"{cfg.mode} needs jsonl or parquet records, got plain text")] * len(units)
    else:
        cleaned = [clean_pretrain(u, cfg) for u in units]
    return _rows(cleaned, units, cfg)


def read_cleaned(files: list[str], cfg: DataConfig):
    """One Ray dataset of cleaned rows over all input files, whatever their formats."""
    import ray.data

    by_format: dict[str, list[str]] = {}
    for f in files:
        fmt = cfg.format if cfg.format != "auto" else detect_format(f)
        by_format.setdefault(fmt, []).append(f)
    parts = []
    if "jsonl" in by_format:
        parts.append(ray.data.read_text(by_format["jsonl"]).map_batches(clean_json_lines, fn_kwargs={"cfg": cfg}, batch_format="numpy"))
    if "parquet" in by_format:
        parts.append(ray.data.read_parquet(by_format["parquet"]).map_batches(clean_records, fn_kwargs={"cfg": cfg}, batch_format="pyarrow"))
    if "text" in by_format:
        parts.append(ray.data.read_binary_files(by_format["text"]).map_batches(clean_text_files, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=8))
    ds = parts[0]
    return ds.union(*parts[1:]) if len(parts) > 1 else ds
