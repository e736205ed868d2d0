"""Fixtures for the training tests: a prepared dataset in exactly the layout `rayllm prepare` writes
(manifest.json, tokenizer/, train|val/*.parquet with input_ids, labels, doc_ids), a private local Ray,
tiny configs, and readers for what a run leaves behind."""

from __future__ import annotations

import glob
import json
import os
import random
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rayllm" / "torch_extensions"))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a bird", "the teacher", "our neighbour"]
_VERBS = ["sees", "likes", "paints", "follows", "builds", "finds", "carries", "remembers"]
_OBJECTS = ["a red ball", "the blue house", "three apples", "the small boat", "a long letter", "the green door"]


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of simple, learnable sentences (a model's loss falls quickly on them)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(rng.randint(2, 8))]
        docs.append(" ".join(sentences))
    return docs


def train_tokenizer(docs: list[str], out_dir: Path, vocab_size: int = 512):
    """A byte-level BPE saved as a PreTrainedTokenizerFast folder with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def _pack(token_docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, list]:
    """Concatenate (ids, labels) documents into rows of exactly seq_len; doc_ids count documents per row."""
    rows = {"input_ids": [], "labels": [], "doc_ids": []}
    ids, labels, docs = [], [], []
    for ids_d, labels_d in token_docs:
        pos = 0
        while pos < len(ids_d):
            take = min(seq_len - len(ids), len(ids_d) - pos)
            doc_index = (docs[-1] + 1) if docs and pos == 0 else (docs[-1] if docs else 0)
            ids += ids_d[pos:pos + take]
            labels += labels_d[pos:pos + take]
            docs += [doc_index] * take
            pos += take
            if len(ids) == seq_len:
                rows["input_ids"].append(ids); rows["labels"].append(labels); rows["doc_ids"].append(docs)
                ids, labels, docs = [], [], []
    if ids:
        pad = seq_len - len(ids)
        rows["input_ids"].append(ids + [pad_id] * pad)
        rows["labels"].append(labels + [-100] * pad)
        rows["doc_ids"].append(docs + [-1] * pad)
    return rows


def _sft_example(tokenizer, doc: str) -> tuple[list[int], list[int]]:
    question, _, answer = doc.partition(". ")
    messages = [{"role": "user", "content": question + "?"}, {"role": "assistant", "content": answer or question}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return ids, [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]


def make_dataset(out_dir: str | Path, *, seq_len: int = 64, n_docs: int = 400, val_docs: int = 40, mode: str = "pretrain",
                 tokenizer=None, seed: int = 0, shards: int = 2) -> Path:
    """Write a prepared dataset; `tokenizer` (e.g. a real model's) replaces the freshly trained BPE."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = corpus(n_docs + val_docs, seed)
    if tokenizer is None:
        tokenizer = train_tokenizer(docs[:n_docs], out / "tokenizer")
    else:
        tokenizer.save_pretrained(out / "tokenizer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits = {}
    for split, part in (("train", docs[:n_docs]), ("val", docs[n_docs:])):
        if mode == "sft":
            token_docs = [_sft_example(tokenizer, d) for d in part]
        else:
            token_docs = []
            for d in part:
                ids = tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                token_docs.append((ids, list(ids)))
        rows = _pack(token_docs, seq_len, pad_id)
        (out / split).mkdir(exist_ok=True)
        n = len(rows["input_ids"])
        bounds = [round(i * n / shards) for i in range(shards + 1)]
        for s in range(shards):
            lo, hi = bounds[s], bounds[s + 1]
            table = pa.table({k: pa.array(v[lo:hi], type=pa.list_(pa.int32())) for k, v in rows.items()})
            pq.write_table(table, out / split / f"part-{s:05d}.parquet")
        pad_tokens = sum(row.count(-1) for row in rows["doc_ids"])
        splits[split] = {"path": split, "sequences": n, "tokens": n * seq_len - pad_tokens, "documents": len(part), "pad_tokens": pad_tokens}
    manifest = {"schema_version": 1, "mode": mode, "seq_len": seq_len, "tokenizer": "tokenizer", "splits": splits,
                "config_hash": f"fixture-{seed}-{mode}-{seq_len}"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def tiny_config(dataset: Path, output_dir: Path, **train_overrides) -> dict:
    """A raw config mapping for a 2-layer d=64 Llama on 2 CPU workers; overrides go into `train:`.
    Workers read the shards themselves (`ingest: files`, a few seconds less per run): the tests of
    what Ray Data ingest does (test_train_ingest.py, the resume tests, the demo, the two-node job)
    ask for `ray_data`, and test_train_ingest.py shows both modes train identically."""
    model = train_overrides.pop("model", {})
    train = {
        "dataset": str(dataset), "output_dir": str(output_dir), "run_name": "run", "num_workers": 2,
        "cpus_per_worker": 0.5, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 12,
        "learning_rate": 3e-3, "warmup_steps": 2, "eval_every": 6, "eval_batches": 2, "save_every": 6,
        "logging_steps": 1, "max_failures": 0, "zero_stage": 2, "ingest": "files", **train_overrides,
    }
    model = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128, "dtype": "float32", **model}
    return {"model": model, "train": train}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """step → training loss, the last record of each step winning (a resumed run rewrites its tail)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m and "event" not in m}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"), seq_len=64)


def train(raw: dict) -> dict:
    """`rayllm train` on a raw config mapping, as the CLI does after loading YAML."""
    from rayllm.config import parse_config
    from rayllm.train.launch import run

    return run(parse_config(raw))


def wandb_history(run_dir) -> list[dict]:
    """The history rows of the offline W&B run under `run_dir`, read from its transaction log.
    wandb 0.31 ships no Python reader for that log (its datastore module is gone): this follows its
    framing (LevelDB's log format, 32 KiB blocks, a 7-byte ':W&B' file header) and parses each
    record with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, chunks, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows
