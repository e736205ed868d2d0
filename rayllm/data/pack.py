"""Packing documents into fixed-length sequences: pure numpy, unit-tested.

Documents (each already ending in EOS, or in the chat template's end token) are laid end to end
and cut every `seq_len` tokens. A document longer than a sequence continues in the next one.
`doc_ids` numbers the documents inside each sequence from 0 (a continued document is 0 in its
new sequence), so training can reset positions and attention per document. The tail — the
last, partial sequence of a batch — is padded: pad tokens carry label -100 and doc id -1 and are
counted, so no token is dropped and none is silently invented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass
class Packed:
    input_ids: np.ndarray  # int32 [rows, seq_len]
    labels: np.ndarray  # int32 [rows, seq_len]; IGNORE_INDEX where no loss
    doc_ids: np.ndarray  # int32 [rows, seq_len]; -1 on padding
    n_tokens: np.ndarray  # int32 [rows]: real (non-pad) tokens
    n_docs: np.ndarray  # int32 [rows]: documents that start in this row

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(docs: list[np.ndarray], seq_len: int, pad_id: int, labels: list[np.ndarray] | None = None) -> Packed:
    """Pack token arrays (and optional per-token labels; default: the tokens) into rows."""
    if labels is None:
        labels = docs
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    keep = lengths > 0
    if not keep.all():
        docs = [d for d, k in zip(docs, keep) if k]
        labels = [l for l, k in zip(labels, keep) if k]
        lengths = lengths[keep]
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    size = rows * seq_len
    ids = np.full(size, pad_id, dtype=np.int32)
    lab = np.full(size, IGNORE_INDEX, dtype=np.int32)
    doc = np.full(size, -1, dtype=np.int64)
    if total:
        ids[:total] = np.concatenate(docs)
        lab[:total] = np.concatenate(labels)
        doc[:total] = np.repeat(np.arange(len(lengths)), lengths)
    doc = doc.reshape(rows, seq_len)
    first_doc = doc[:, :1]
    real = doc >= 0
    local = np.where(real, doc - first_doc, -1).astype(np.int32)
    starts = np.zeros(size, dtype=bool)
    if total:
        starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
    return Packed(
        input_ids=ids.reshape(rows, seq_len),
        labels=lab.reshape(rows, seq_len),
        doc_ids=local,
        n_tokens=real.sum(axis=1).astype(np.int32),
        n_docs=starts.reshape(rows, seq_len).sum(axis=1).astype(np.int32),
    )


def to_arrow(packed: Packed):
    """A pyarrow table with list<int32> columns, the prepared-dataset row layout."""
    import pyarrow as pa

    rows, seq_len = packed.input_ids.shape
    offsets = pa.array(np.arange(0, (rows + 1) * seq_len, seq_len, dtype=np.int32))

    def col(a: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1)))

    return pa.table(
        {
            "input_ids": col(packed.input_ids),
            "labels": col(packed.labels),
            "doc_ids": col(packed.doc_ids),
            "n_tokens": pa.array(packed.n_tokens),
            "n_docs": pa.array(packed.n_docs),
        }
    )
