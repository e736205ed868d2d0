"""`rayllm prepare`: raw files → a prepared dataset (parquet shards, tokenizer, manifest).

read+clean → count and sample rejects → exact dedup (hash shuffle, so global, not per block) →
split by content hash → tokenizer (train a BPE on the train split, or copy an existing one) →
tokenize+pack per split → parquet, written into a staging folder that replaces the output only
once complete. Rerunning with the same config and unchanged inputs does nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rayllm import console
from rayllm.config import config_hash
from rayllm.config.data import DataConfig
from rayllm.data.manifest import SCHEMA_VERSION, read_manifest, summary_table, write_manifest
from rayllm.data.read import input_fingerprint, read_cleaned, resolve_inputs

SPLITS = ("train", "val")


class PrepareError(RuntimeError):
    pass


def run(cfg: DataConfig, address: str | None = None, force: bool = False) -> dict[str, Any]:
    files = resolve_inputs(cfg.inputs)  # a wrong path fails here, before Ray starts
    out = Path(cfg.output_dir).resolve()
    fingerprint = input_fingerprint(files)
    chash = config_hash(cfg)
    old = read_manifest(out)
    if old and not force and old.get("config_hash") == chash and old.get("input_fingerprint") == fingerprint:
        print(summary_table(old))
        console.get().say(f"prepare {out.name}: {out} is up to date (config {chash}, inputs {fingerprint}); --force rebuilds")
        return old

    from rayllm.ray_session import ray_session

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    started = time.time()
    try:
        with ray_session(address, dashboard=False), console.get().progress(f"prepare {out.name}") as bar:
            # Ray Data needs no dashboard; starting one costs seconds
            manifest = _prepare(cfg, files, stage, out.parent / f"{out.name}.rejects.jsonl", _Phases(bar))
        manifest.update(
            schema_version=SCHEMA_VERSION,
            output_dir=str(out),
            tokenizer_path=str(out / "tokenizer"),
            rejects_file=str(out / "rejects.jsonl") if manifest["rows_rejected"] else None,
            config_hash=chash,
            input_fingerprint=fingerprint,
            input_files=len(files),
            config=cfg.model_dump(mode="json"),
            seconds=round(time.time() - started, 1),
        )
        write_manifest(stage, manifest)
        _replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(summary_table(manifest))
    console.get().say(f"prepare {out.name}: {_one_line(manifest)} → {out}")
    return manifest


class _Phases:
    """The progress line of a prepare: the phase, the rows it went through and their rate (rows over
    the time since the prepare began, as a person reads it)."""

    def __init__(self, bar):
        self.bar, self.started = bar, time.time()

    def __call__(self, phase: str, rows: int) -> None:
        took = max(time.time() - self.started, 1e-9)
        counted = f"  {rows:,} rows  {rows / took:,.0f} rows/s" if rows else ""  # none counted before the read ends
        self.bar.update(f"{phase}{counted}  {console.clock_text(took)}")


def _one_line(m: dict[str, Any]) -> str:
    splits = " / ".join(f"{s['sequences']:,} {name}" for name, s in m["splits"].items())
    return (f"{m['rows_in']:,} rows in, {m['rows_rejected']:,} rejected, {m['duplicates_removed']:,} duplicates removed → "
            f"{splits} sequences of {m['seq_len']} tokens in {m['seconds']} s ({m['rows_in'] / max(m['seconds'], 1e-9):,.0f} rows/s)")


def _replace(stage: Path, out: Path) -> None:
    """Swap the finished staging folder in; the old output disappears only after that."""
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(trash)
    stage.rename(out)
    shutil.rmtree(trash, ignore_errors=True)


def _check_rejects(rejects: "_Rejects", rows_in: int, cfg: DataConfig, failed_file: Path) -> float:
    """The reject fraction; past data.max_reject_fraction the run stops, samples kept for people."""
    rejected = sum(rejects.counts.values())
    fraction = rejected / rows_in if rows_in else 0.0
    if fraction > cfg.max_reject_fraction:
        rejects.write(failed_file)
        raise PrepareError(
            f"{rejected:,} of {rows_in:,} rows rejected ({fraction:.2%}) > data.max_reject_fraction "
            f"({cfg.max_reject_fraction:.2%}); reasons: {rejects.counts}; samples in {failed_file}. "
            "Fix the input, or raise data.max_reject_fraction if these rows are expected."
        )
    return fraction


def _prepare(cfg: DataConfig, files: list[str], stage: Path, failed_file: Path, phase=lambda name, rows: None) -> dict[str, Any]:
    phase("read+clean", 0)
    cleaned = read_cleaned(files, cfg).materialize()
    rows_in = cleaned.count()
    phase("rejects+dedup", rows_in)
    if rows_in == 0:
        raise PrepareError(f"data.inputs: {len(files)} file(s) hold no rows")
    rejects = _rejects(cleaned, cfg.rejects_sample)
    _check_rejects(rejects, rows_in, cfg, failed_file)  # fail early, before tokenizing
    kept = cleaned.filter(lambda r: r["reject"] == "").select_columns(["content", "hash", "split"])
    n_kept = rows_in - sum(rejects.counts.values())
    if n_kept == 0:  # max_reject_fraction 1 let it through; nothing is left to tokenize
        rejects.write(failed_file)
        what = "preference pairs" if cfg.mode == "preference" else "rows"
        raise PrepareError(f"no valid {what} in {rows_in:,} rows; rejects: {rejects.counts}; samples in {failed_file}")
    unique = _dedup(kept, n_kept, cleaned.num_blocks()) if cfg.dedup else kept
    unique = unique.materialize()
    n_unique = unique.count()
    unique = spread(unique, n_unique, cfg.batch_size, cfg.num_actors)
    pool = use_actor_pool(n_unique, cfg.batch_size, cfg.num_actors)
    phase("tokenizer", n_unique)

    tokenizer_dir = stage / "tokenizer"
    source, tok = _tokenizer(cfg, unique, n_unique, tokenizer_dir)
    if cfg.mode in ("sft", "preference"):
        unique = _render_drop_long(unique, cfg, str(tokenizer_dir), rejects, pool)
    split_stats = {}
    phase("tokenize+pack", n_unique)
    for name in SPLITS:
        ds = unique.filter(lambda r, s=name: r["split"] == s)
        if pool:  # materialized, so the tokenizer actors (which may hold every CPU) have no upstream task to wait on
            ds = ds.materialize()
        split_stats[name] = _tokenize_and_write(ds, cfg, str(tokenizer_dir), tok.eos_token_id, tok.pad_token_id, stage / name, pool)
    fraction = _check_rejects(rejects, rows_in, cfg, failed_file)
    pairs = {name: s["sequences"] for name, s in split_stats.items()} if cfg.mode == "preference" else None
    if pairs is not None and not sum(pairs.values()):
        rejects.write(failed_file)
        raise PrepareError(f"no valid preference pairs in {rows_in:,} rows; rejects: {rejects.counts}; samples in {failed_file}")
    rows_rejected = sum(rejects.counts.values())
    rejects.write(stage / "rejects.jsonl")
    failed_file.unlink(missing_ok=True)
    return {
        "mode": cfg.mode,
        "seq_len": cfg.seq_len,
        "tokenizer": "tokenizer",
        "tokenizer_source": source,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "rows_in": rows_in,
        "rows_kept": n_kept - rejects.counts.get("too_many_tokens", 0),
        "rows_rejected": rows_rejected,
        "reject_fraction": fraction,
        "max_reject_fraction": cfg.max_reject_fraction,
        "rejects": dict(rejects.counts),
        "duplicates_removed": n_kept - n_unique,
        "documents": sum(s["documents"] for s in split_stats.values()),
        "splits": split_stats,
        **({"pairs": sum(pairs.values())} if pairs is not None else {}),
    }


def use_actor_pool(rows: int, batch_size: int, num_actors: int) -> bool:
    """An actor pool starts `num_actors` processes that each load the tokenizer before the first
    batch; it repays that only when its actors get more than two batches each. Fewer rows run as
    plain tasks on the worker processes Ray already has (one tokenizer per process, kept between
    tasks), in parallel over the blocks `spread` made."""
    return rows > 2 * batch_size * num_actors


def blocks_wanted(rows: int, batch_size: int, num_actors: int) -> int:
    """Blocks the tokenize stage needs so every actor (or parallel task) has work: Ray Data hands an
    actor or a task whole blocks, so one block keeps one process busy however many rows it holds."""
    return max(1, min(math.ceil(rows / batch_size), 4 * num_actors))


def spread(ds, rows: int, batch_size: int, num_actors: int):
    """`ds` (materialized) split into `blocks_wanted` blocks when it has fewer, order kept. Dedup leaves
    anything under 100,000 rows in one block, and one input file reads as one: without this the whole
    tokenize stage ran in one process. A dataset already in enough blocks (a cluster's) is unchanged."""
    want = blocks_wanted(rows, batch_size, num_actors)
    if ds.num_blocks() >= want:
        return ds
    return ds.repartition(want).materialize()


def _map_stage(ds, cls: type, init: dict[str, Any], cfg: DataConfig, batch_size: int, pool: bool):
    from ray.data import ActorPoolStrategy

    if pool:
        return ds.map_batches(cls, fn_constructor_kwargs=init, batch_size=batch_size, compute=ActorPoolStrategy(size=cfg.num_actors),
                              num_cpus=cfg.actor_cpus, batch_format="numpy")
    from rayllm.data.tokenize import in_task

    return ds.map_batches(in_task, fn_kwargs={"cls": cls, "init": init}, batch_size=batch_size, num_cpus=cfg.actor_cpus,
                          batch_format="numpy")


class _Rejects:
    """Counts per reason and up to `limit` samples per reason."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.samples: list[dict[str, str]] = []

    def add(self, reason: str, n: int, samples: list[dict[str, str]]) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n
            have = sum(1 for s in self.samples if s["reason"] == reason)
            self.samples += samples[: max(0, self.limit - have)]

    def write(self, path: Path) -> None:
        with path.open("w") as f:
            for s in self.samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")


def _summary(keys: list[str], key: str, counts: list[int], samples: list[str]):
    """One row per key: a count and a JSON list of samples (typed, so empty blocks agree too)."""
    import pyarrow as pa

    return pa.table({key: pa.array(keys, pa.string()), "n": pa.array(counts, pa.int64()), "samples": pa.array(samples, pa.string())})


def _block_rejects(block: dict[str, np.ndarray], limit: int):
    """Per block: the rejected rows per reason and up to `limit` samples of each (JSON), so one pass
    over the dataset gives the counts and the samples, whatever its size."""
    reasons, counts, samples = [], [], []
    rejected = block["reject"] != ""
    for reason in sorted(set(block["reject"][rejected])):
        rows = np.flatnonzero(block["reject"] == reason)
        reasons.append(reason)
        counts.append(len(rows))
        samples.append(json.dumps([{"reason": reason, "detail": str(block["detail"][i]), "raw": str(block["raw"][i])}
                                   for i in rows[:limit]]))
    return _summary(reasons, "reason", counts, samples)


def _rejects(cleaned, limit: int) -> _Rejects:
    per_block = cleaned.select_columns(["reject", "detail", "raw"]).map_batches(
        _block_rejects, fn_kwargs={"limit": limit}, batch_size=None, batch_format="numpy").take_all()
    counts: dict[str, int] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for row in per_block:
        counts[row["reason"]] = counts.get(row["reason"], 0) + int(row["n"])
        samples.setdefault(row["reason"], []).extend(json.loads(row["samples"]))
    out = _Rejects(limit)
    for reason in sorted(counts):
        out.add(reason, counts[reason], samples[reason][:limit])
    return out


def _drop_duplicates(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    _, first = np.unique(block["hash"].astype(str), return_index=True)
    first.sort()
    return {k: v[first] for k, v in block.items()}


def _dedup(kept, n_rows: int, n_blocks: int):
    """Exact dedup over the whole dataset: a hash shuffle puts every copy of a document in the
    same block, so dropping duplicates inside each block drops them everywhere. When one block
    holds everything, there is nothing to shuffle."""
    blocks = max(1, math.ceil(n_rows / 100_000))
    if blocks > 1:
        kept = kept.repartition(blocks, keys=["hash"])
    elif n_blocks > 1:
        kept = kept.repartition(1)
    return kept.map_batches(_drop_duplicates, batch_size=None, batch_format="numpy")


def _tokenizer_texts(unique, n_unique: int, cfg: DataConfig) -> Iterator[str]:
    """A deterministic sample (by content hash) of at most max_train_docs train documents."""
    n = n_unique
    if n > cfg.tokenizer.max_train_docs:  # then the sampling rate needs the train split's own size
        n = unique.filter(lambda r: r["split"] == "train").count()
    keep = min(1.0, cfg.tokenizer.max_train_docs / max(n, 1))
    for batch in unique.iter_batches(batch_size=1024, batch_format="numpy"):
        for content, digest, split in zip(batch["content"], batch["hash"], batch["split"]):
            if split == "train" and (keep >= 1.0 or int(digest[:8], 16) / 16**8 < keep):
                if cfg.mode == "preference":
                    from rayllm.data.preference import pair_text

                    yield pair_text(content)
                elif cfg.mode == "sft":
                    yield "\n".join(m["content"] for m in json.loads(content))
                else:
                    yield content


def _tokenizer(cfg: DataConfig, unique, n_unique: int, out_dir: Path) -> tuple[str, Any]:
    """The tokenizer saved in out_dir, how it was made, and the tokenizer itself (reloading it
    through AutoTokenizer would import transformers' model registry: seconds, for ids we hold)."""
    if cfg.tokenizer.path:
        from rayllm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer.path)
        if not tok.chat_template and cfg.mode in ("sft", "preference"):
            from rayllm.chat import DEFAULT_CHAT_TEMPLATE

            tok.chat_template = cfg.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        tok.save_pretrained(str(out_dir))
        return f"copied from {cfg.tokenizer.path}", tok
    from rayllm.data.tokenizer import checked, train_tokenizer

    tok = train_tokenizer(_tokenizer_texts(unique, n_unique, cfg), cfg.tokenizer, out_dir)
    return "byte-level BPE trained on the train split", checked(tok, out_dir)


def _block_too_long(block: dict[str, np.ndarray], seq_len: int, limit: int):
    """Per block and split: conversations longer than seq_len, and up to `limit` samples (JSON)."""
    splits, counts, samples = [], [], []
    for name in SPLITS:
        rows = np.flatnonzero((block["n"] > seq_len) & (block["split"] == name))
        if len(rows):
            splits.append(name)
            counts.append(len(rows))
            samples.append(json.dumps([{"reason": "too_many_tokens", "detail": f"{block['n'][i]} tokens > seq_len {seq_len}",
                                        "raw": str(block["content"][i])[:500]} for i in rows[:limit]]))
    return _summary(splits, "split", counts, samples)


def _render_drop_long(ds, cfg: DataConfig, tokenizer_dir: str, rejects: _Rejects, pool: bool):
    """Renders every conversation (sft) or pair (preference), both splits in one pass, counts those
    longer than seq_len as rejects (train's samples first), and returns the rest."""
    from rayllm.data.preference import PreferenceRender
    from rayllm.data.tokenize import SftRender

    render = PreferenceRender if cfg.mode == "preference" else SftRender
    rendered = _map_stage(ds, render, {"tokenizer_dir": tokenizer_dir}, cfg, 256, pool).materialize()
    per_block = rendered.select_columns(["n", "split", "content"]).map_batches(
        _block_too_long, fn_kwargs={"seq_len": cfg.seq_len, "limit": cfg.rejects_sample}, batch_size=None,
        batch_format="numpy").take_all()
    for name in SPLITS:
        rows = [r for r in per_block if r["split"] == name]
        samples = [s for r in rows for s in json.loads(r["samples"])]
        rejects.add("too_many_tokens", sum(int(r["n"]) for r in rows), samples[: cfg.rejects_sample])
    return rendered.filter(lambda r: r["n"] <= cfg.seq_len)


def _tokenize_and_write(ds, cfg: DataConfig, tokenizer_dir: str, eos_id: int, pad_id: int, out: Path, pool: bool) -> dict[str, int]:
    from rayllm.data.tokenize import PretrainTokenizePack, pack_sft

    if cfg.mode == "preference":  # one pair per row, never split across rows
        from rayllm.data.preference import pair_rows

        packed = ds.map_batches(pair_rows, fn_kwargs={"seq_len": cfg.seq_len, "pad_id": pad_id}, batch_size=cfg.batch_size, batch_format="numpy")
    elif cfg.mode == "sft":
        packed = ds.map_batches(pack_sft, fn_kwargs={"seq_len": cfg.seq_len, "pad_id": pad_id}, batch_size=cfg.batch_size, batch_format="numpy")
    else:
        init = {"tokenizer_dir": tokenizer_dir, "seq_len": cfg.seq_len, "threads": max(1, int(cfg.actor_cpus)),
                "eos_id": eos_id, "pad_id": pad_id}
        packed = _map_stage(ds, PretrainTokenizePack, init, cfg, cfg.batch_size, pool)
    # Writing is I/O: zero CPUs, so it is never starved by the actors that hold them.
    packed.write_parquet(str(out), min_rows_per_file=4096, ray_remote_args={"num_cpus": 0})
    return _split_stats(out, cfg.seq_len)


def _split_stats(split_dir: Path, seq_len: int) -> dict[str, int]:
    import pyarrow.dataset as pads

    split_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(str(f) for f in split_dir.glob("*.parquet"))
    if files:
        table = pads.dataset(files, format="parquet").to_table(columns=["n_tokens", "n_docs"])
        sequences, tokens, docs = table.num_rows, int(np.asarray(table["n_tokens"]).sum()), int(np.asarray(table["n_docs"]).sum())
    else:  # an empty split (e.g. val_fraction 0) writes no file
        sequences = tokens = docs = 0
    return {
        "path": split_dir.name,
        "sequences": sequences,
        "tokens": tokens,
        "documents": docs,
        "pad_tokens": sequences * seq_len - tokens,
        "files": len(files),
    }
