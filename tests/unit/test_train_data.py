"""Prepared shards → micro-batches: document positions, a deterministic order, disjoint rank slices."""

import numpy as np
import pytest

from rayllm.train.data import PackedSplit, StreamOrder, micro_slice, positions_from_doc_ids, read_manifest
from tests.ray.train_fixtures import make_dataset


def test_positions_restart_at_each_document():
    docs = np.array([[0, 0, 0, 1, 1, 2, -1, -1]])
    positions, starts = positions_from_doc_ids(docs)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert starts.tolist() == [[True, False, False, True, False, True, True, False]]


def test_order_is_a_seeded_permutation_per_epoch():
    order = StreamOrder(10, seed=3)
    first = np.concatenate([order.global_batch(c, 5) for c in range(2)])
    assert sorted(first.tolist()) == list(range(10)), "one epoch visits every sequence once"
    again = StreamOrder(10, seed=3)
    assert again.global_batch(7, 4).tolist() == StreamOrder(10, seed=3).global_batch(7, 4).tolist()
    assert StreamOrder(10, seed=4).global_batch(0, 10).tolist() != first.tolist()
    second_epoch = np.concatenate([order.global_batch(c, 5) for c in range(2, 4)])
    assert sorted(second_epoch.tolist()) == list(range(10)) and second_epoch.tolist() != first.tolist()


def test_micro_slices_partition_the_global_batch():
    idx = np.arange(24)
    parts = [micro_slice(idx, m, r, world=2, micro=4) for m in range(3) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(24))


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_reads_the_prepared_layout(tmp_path, mode):
    ds = make_dataset(tmp_path, seq_len=32, n_docs=40, val_docs=6, mode=mode)
    manifest = read_manifest(ds)
    split = PackedSplit.read(ds, "train")
    assert len(split) == manifest["splits"]["train"]["sequences"] and split.input_ids.shape[1] == 32
    batch = split.batch([0, 1])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 32)
    if mode == "sft":
        assert (split.labels == -100).mean() > 0.2, "prompts carry no loss"


def test_rejects_a_foreign_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="rayllm prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema_version": 2}')
    with pytest.raises(ValueError, match="schema_version"):
        read_manifest(tmp_path)
