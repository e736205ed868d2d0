"""Packed SFT rows → encoder-decoder examples, for T5-style seq2seq training.

A prepared SFT dataset holds conversations packed into rows, with labels -100 everywhere but the
assistant turns. An encoder-decoder reads the prompt and writes the answer, so each conversation in
a row becomes one example: the encoder gets the tokens that carry no loss (system and user turns,
template tokens), the decoder learns the tokens that do (the assistant turns, end tokens included).
The same rows, order and data position serve causal and seq2seq runs alike; only the batch differs.

A conversation cut by a row boundary yields a fragment on each side; a fragment with no prompt or
no answer left is not an example, and its answer tokens are not counted as targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayllm.train.data import IGNORE, PackedSplit


def examples_of_row(input_ids: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(source ids, target ids) of each conversation in one packed row, in order."""
    out = []
    for doc in np.unique(doc_ids[doc_ids >= 0]):
        at = doc_ids == doc
        ids, lab = input_ids[at], labels[at]
        answer = lab != IGNORE
        source, target = ids[~answer], ids[answer]
        if source.size and target.size:
            out.append((source, target))
    return out


def pad_examples(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int, start_id: int) -> dict:
    """Right-padded tensors: input_ids + attention_mask for the encoder, decoder_input_ids (the
    target shifted right behind the decoder start token) and labels (-100 on padding)."""
    import torch

    n = max(len(examples), 1)
    src_len = max((len(s) for s, _ in examples), default=1)
    tgt_len = max((len(t) for _, t in examples), default=1)
    input_ids = np.full((n, src_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, src_len), dtype=np.int64)
    labels = np.full((n, tgt_len), IGNORE, dtype=np.int64)
    decoder = np.full((n, tgt_len), pad_id, dtype=np.int64)
    for i, (src, tgt) in enumerate(examples):
        input_ids[i, :len(src)], mask[i, :len(src)] = src, 1
        labels[i, :len(tgt)] = tgt
        decoder[i, 0] = start_id
        decoder[i, 1:len(tgt)] = tgt[:-1]
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "decoder_input_ids": torch.from_numpy(decoder), "labels": torch.from_numpy(labels)}


@dataclass
class Seq2SeqSplit:
    """A PackedSplit seen as encoder-decoder examples; same interface as PackedSplit for the loop
    (rows are still the unit of order and data position)."""

    rows: PackedSplit
    pad_id: int
    start_id: int

    def __len__(self) -> int:
        return len(self.rows)

    def examples(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        r = self.rows
        return [ex for i in np.atleast_1d(indices) for ex in examples_of_row(r.input_ids[i], r.labels[i], r.doc_ids[i])]

    def batch(self, indices, document_masking: bool = True) -> dict:
        """`document_masking` is moot here: every conversation is its own example."""
        return pad_examples(self.examples(indices), self.pad_id, self.start_id)

    def target_tokens(self, indices, document_masking: bool = True) -> int:
        return sum(len(t) for _, t in self.examples(indices))
