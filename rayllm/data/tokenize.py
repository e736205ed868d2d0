"""Ray Data stages that turn cleaned documents into packed training rows.

`PretrainTokenizePack` tokenizes and packs in one actor stage (one pass, no intermediate token
lists between stages). SFT runs in two stages — `SftRender` then `pack_sft` — because a
conversation longer than `seq_len` must be counted as a reject, not split mid-turn.

The stages are callable classes, for an actor pool on large inputs; `in_task` runs the same class
as a plain Ray task (one instance per worker process), for inputs too small to repay starting a pool.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from rayllm.data.pack import pack, to_arrow


class PretrainTokenizePack:
    """Actor: loads the tokenizer once; each batch of documents → packed rows."""

    def __init__(self, tokenizer_dir: str, seq_len: int, threads: int = 1, eos_id: int | None = None, pad_id: int | None = None):
        # The Rust tokenizer sizes its thread pool once per process, from this variable.
        os.environ.setdefault("RAYON_RS_NUM_CPUS", str(max(1, threads)))
        from tokenizers import Tokenizer

        if eos_id is None or pad_id is None:  # importing transformers costs seconds: callers that know the ids pass them
            from rayllm.data.tokenizer import load_tokenizer

            hf = load_tokenizer(tokenizer_dir)
            eos_id, pad_id = hf.eos_token_id, hf.pad_token_id
        self.tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        self.eos = np.array([eos_id], dtype=np.int32)
        self.pad = pad_id
        self.seq_len = seq_len

    def __call__(self, batch: dict[str, np.ndarray]):
        encodings = self.tok.encode_batch_fast(list(batch["content"]), add_special_tokens=False)
        docs = [np.concatenate((np.asarray(e.ids, dtype=np.int32), self.eos)) for e in encodings]
        return to_arrow(pack(docs, self.seq_len, self.pad))


class SftRender:
    """Actor: conversations (canonical JSON) → token ids and assistant-only labels."""

    def __init__(self, tokenizer_dir: str):
        from rayllm.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rayllm.chat import render_chat

        ids, labels = [], []
        for content in batch["content"]:
            r = render_chat(self.tok, json.loads(content))
            ids.append(np.asarray(r.input_ids, dtype=np.int32))
            labels.append(np.asarray(r.labels(), dtype=np.int32))
        out = {
            "ids": np.array(ids + [None], dtype=object)[:-1],
            "labels": np.array(labels + [None], dtype=object)[:-1],
            "n": np.array([len(x) for x in ids], dtype=np.int64),
            "content": batch["content"],
        }
        if "split" in batch:
            out["split"] = batch["split"]
        return out


_INSTANCE: dict[type, tuple[str, Any]] = {}


def in_task(batch, cls: type, init: dict[str, Any]):
    """`cls(**init)(batch)` with the instance kept for the next task in the same worker process."""
    key = json.dumps(init, sort_keys=True)
    held = _INSTANCE.get(cls)
    if held is None or held[0] != key:
        held = _INSTANCE[cls] = (key, cls(**init))
    return held[1](batch)


def pack_sft(batch: dict[str, np.ndarray], seq_len: int, pad_id: int):
    return to_arrow(pack(list(batch["ids"]), seq_len, pad_id, labels=list(batch["labels"])))
