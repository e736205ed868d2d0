"""Prepared shards → micro-batches, with a data position that is one integer.

The shards reach every worker whole, in file order: streamed in by Ray Data (`train.ingest:
ray_data`, the dataset given to the TorchTrainer unsplit, order preserved) or read by the worker
itself with pyarrow (`files`). Both give the same arrays. The order is then a seeded permutation
per epoch over an endless stream, so global batch number `cursor` is the same sequences on any
run, after any restart: the checkpoint stores `cursor` and nothing else. (Ray Data's
streaming_split hands out blocks first come, first served, so a split's rows would differ between
runs and a resumed run could not find its place.)

Each worker holds the split's token ids in memory (int32, 3 arrays of sequences × seq_len): fine up
to a few hundred million tokens per node; beyond that, memory-map the shards instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = -100


def read_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train.dataset must be the output_dir of `rayllm prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != 1:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')!r} is not 1; re-run `rayllm prepare`")
    return manifest


COLUMNS = ("input_ids", "labels", "doc_ids")


def shard_files(dataset_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """A split's parquet shards in the order that defines its row numbers."""
    manifest = manifest or read_manifest(dataset_dir)
    folder = Path(dataset_dir) / manifest["splits"][split]["path"]
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet shards in {folder}")
    return files


def positions_from_doc_ids(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids restarting at 0 at each document start, mask of document starts) for [B, L] doc ids."""
    idx = np.arange(doc_ids.shape[1])
    starts = np.ones_like(doc_ids, dtype=bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - start_of).astype(np.int64), starts


@dataclass
class PackedSplit:
    """One split of a prepared dataset: input_ids, labels and doc_ids as [sequences, seq_len] int32."""

    input_ids: np.ndarray
    labels: np.ndarray
    doc_ids: np.ndarray

    @classmethod
    def read(cls, dataset_dir: str | Path, split: str) -> "PackedSplit":
        """The split read straight from its parquet files (`train.ingest: files`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = read_manifest(dataset_dir)
        files = shard_files(dataset_dir, split, manifest)
        table = pa.concat_tables(pq.read_table(f, columns=list(COLUMNS)) for f in files)
        return cls.from_table(table, manifest["seq_len"], str(files[0].parent))

    @classmethod
    def from_ray(cls, shard, seq_len: int, what: str) -> "PackedSplit":
        """The split as Ray Data streams it into this worker (a DataIterator over the whole split)."""
        import pyarrow as pa

        tables = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
        if not tables:
            raise ValueError(f"{what}: Ray Data delivered no rows")
        return cls.from_table(pa.concat_tables(tables).select(list(COLUMNS)), seq_len, what)

    @classmethod
    def from_table(cls, table, seq_len: int, what: str) -> "PackedSplit":
        import pyarrow.compute as pc

        def matrix(name: str) -> np.ndarray:
            flat = pc.list_flatten(table.column(name)).to_numpy()
            if flat.size != table.num_rows * seq_len:
                raise ValueError(f"{what}: column {name} is not {table.num_rows} rows × seq_len {seq_len}")
            return flat.astype(np.int32, copy=False).reshape(table.num_rows, seq_len)

        return cls(matrix("input_ids"), matrix("labels"), matrix("doc_ids"))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices, document_masking: bool = True) -> dict:
        """Tensors for the model: input_ids, labels (targets across a document start dropped) and
        position_ids restarting per document, from which transformers builds a block-diagonal causal
        mask for sdpa/eager/flash attention (no document attends to another)."""
        import torch

        ids, labels, docs = self.input_ids[indices], self.labels[indices].copy(), self.doc_ids[indices]
        out = {"input_ids": torch.from_numpy(ids.astype(np.int64))}
        if document_masking:
            positions, starts = positions_from_doc_ids(docs)
            starts[:, 0] = False
            labels[starts] = IGNORE  # the token before a document start cannot see the new document
            out["position_ids"] = torch.from_numpy(positions)
        out["labels"] = torch.from_numpy(labels.astype(np.int64))
        return out

    def target_tokens(self, indices, document_masking: bool = True) -> int:
        """Tokens that carry a loss in these sequences (after the shift the model applies)."""
        labels = self.labels[indices]
        keep = labels[:, 1:] != IGNORE
        if document_masking:
            _, starts = positions_from_doc_ids(self.doc_ids[indices])
            keep &= ~starts[:, 1:]
        return int(keep.sum())


class StreamOrder:
    """Sample order: epoch e visits all sequences in permutation(seed, e); batches may span epochs."""

    def __init__(self, num_sequences: int, seed: int):
        self.n, self.seed = num_sequences, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def global_batch(self, cursor: int, size: int) -> np.ndarray:
        """The sequence indices of global batch number `cursor`."""
        positions = np.arange(cursor * size, (cursor + 1) * size)
        return np.array([self._permutation(p // self.n)[p % self.n] for p in positions], dtype=np.int64)


def micro_slice(global_indices: np.ndarray, micro_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """The rows of a global batch that `rank` trains on in accumulation step `micro_step`."""
    start = (micro_step * world + rank) * micro
    return global_indices[start:start + micro]


def read_splits(ingest: str, dataset: str, seq_len: int, hf_config):
    """(train, val) as the model consumes them: packed rows, or encoder-decoder examples from them.
    The rows arrive through Ray Data (the trainer's datasets) or straight from the parquet files."""
    if ingest == "ray_data":
        import ray.train

        train, val = (PackedSplit.from_ray(ray.train.get_dataset_shard(s), seq_len, f"{dataset} {s}") for s in ("train", "val"))
    else:
        train, val = PackedSplit.read(dataset, "train"), PackedSplit.read(dataset, "val")
    if getattr(hf_config, "is_encoder_decoder", False):
        from rayllm.train.seq2seq import Seq2SeqSplit

        ids = hf_config.pad_token_id, hf_config.decoder_start_token_id
        return Seq2SeqSplit(train, *ids), Seq2SeqSplit(val, *ids)
    return train, val
