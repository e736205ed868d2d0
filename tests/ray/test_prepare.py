"""`prepare` on a real local Ray: exact accounting of rows, rejects, duplicates and tokens."""

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayllm.config.data import DataConfig
from rayllm.data.prepare import PrepareError, run
from tests.ray.corpus import sentence, write_pretrain_corpus, write_sft_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def read_split(path):
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet").to_table()


def test_pretrain_manifest_counts_exactly(tmp_path, ray_local):
    expected = write_pretrain_corpus(tmp_path / "raw")
    cfg = DataConfig(inputs=[str(tmp_path / "raw")], output_dir=str(tmp_path / "out"), seq_len=64, val_fraction=0.1,
                     max_chars=4000, max_reject_fraction=0.1, tokenizer={"vocab_size": 400})
    m = run(cfg)
    assert m["rows_in"] == expected["rows_in"]
    assert m["rejects"] == expected["rejects"]
    assert m["duplicates_removed"] == expected["duplicates_removed"]
    assert m["documents"] == expected["documents"]
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 300
    assert 10 <= m["splits"]["val"]["documents"] <= 60
    rejects = [json.loads(l) for l in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == set(expected["rejects"])

    # every token accounted for: packed tokens = tokens of each document + one EOS each
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    t = read_split(tmp_path / "out" / "train")
    ids = np.array(t["input_ids"].to_pylist())
    docs = np.array(t["doc_ids"].to_pylist())
    assert ids.shape[1] == 64
    assert (docs >= 0).sum() == m["splits"]["train"]["tokens"]
    assert (ids == tok.eos_token_id).sum() == m["splits"]["train"]["documents"]
    labels = np.array(t["labels"].to_pylist())
    assert ((labels == -100) == (docs < 0)).all()

    # rerun: same config and inputs → nothing rebuilt
    again = run(cfg)
    assert again == m


def test_split_is_the_same_whatever_the_block_layout(tmp_path, ray_local):
    write_pretrain_corpus(tmp_path / "raw")
    base = dict(inputs=[str(tmp_path / "raw")], seq_len=64, val_fraction=0.2, max_chars=4000, max_reject_fraction=0.1,
                tokenizer={"vocab_size": 400})
    a = run(DataConfig(output_dir=str(tmp_path / "a"), batch_size=7, **base))
    b = run(DataConfig(output_dir=str(tmp_path / "b"), batch_size=4096, num_actors=1, **base))
    assert a["splits"]["val"]["documents"] == b["splits"]["val"]["documents"]
    assert a["splits"]["val"]["tokens"] == b["splits"]["val"]["tokens"]
    assert a["splits"]["train"]["tokens"] == b["splits"]["train"]["tokens"]


def test_reject_fraction_limit_fails_with_a_clear_message(tmp_path, ray_local):
    write_pretrain_corpus(tmp_path / "raw")
    cfg = DataConfig(inputs=[str(tmp_path / "raw")], output_dir=str(tmp_path / "out"), max_chars=4000,
                     max_reject_fraction=0.01, tokenizer={"vocab_size": 400})
    with pytest.raises(PrepareError, match=r"9 of 323 rows rejected .* > data.max_reject_fraction"):
        run(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert len((tmp_path / "out.rejects.jsonl").read_text().splitlines()) == 9


def test_sft_masks_and_rejects(tmp_path, ray_local):
    expected = write_sft_corpus(tmp_path / "raw")
    cfg = DataConfig(inputs=[str(tmp_path / "raw")], output_dir=str(tmp_path / "out"), mode="sft", seq_len=256,
                     val_fraction=0.0, max_reject_fraction=0.1, tokenizer={"vocab_size": 500})
    m = run(cfg)
    assert m["rows_in"] == expected["rows_in"]
    assert m["rejects"] == expected["rejects"]
    assert m["documents"] == expected["documents"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    t = read_split(tmp_path / "out" / "train")
    ids, labels = np.array(t["input_ids"].to_pylist()), np.array(t["labels"].to_pylist())
    trained = tok.decode(ids[labels != -100])
    untrained = tok.decode(ids[(labels == -100) & (ids != tok.pad_token_id)])
    assert "Answer 1:" in trained and "Response 0:" in trained
    assert "Question 1:" not in trained and "Prompt 0:" not in trained and "<|im_start|>" not in trained
    assert "Question 1:" in untrained and "<|im_start|>assistant" in untrained
    assert trained.count("<|im_end|>") == 30 * 2 + 30  # every assistant turn ends in a trained end token


def test_one_file_is_spread_and_tokenized_by_tasks_into_the_same_sequences_as_an_actor_pool(tmp_path, ray_local, monkeypatch):
    import rayllm.data.prepare as prepare

    # One file, as the demo's corpus: rows keep the file's order (a union of several files orders its
    # rows as the reads finish, and packing follows row order).
    rng = random.Random(0)
    lines = [sentence(rng) for _ in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines + lines[:5]) + "\n")
    base = dict(inputs=[str(tmp_path / "corpus.txt")], text_unit="line", seq_len=64, val_fraction=0.2,
                batch_size=7, tokenizer={"vocab_size": 400})  # 7: many batches, so rows alone would ask for a pool
    blocks, spread = [], prepare.spread
    monkeypatch.setattr(prepare, "spread", lambda ds, *a: blocks.append((ds.num_blocks(), (out := spread(ds, *a)).num_blocks())) or out)
    monkeypatch.setattr(prepare, "use_actor_pool", lambda *args: False)
    tasks = run(DataConfig(output_dir=str(tmp_path / "tasks"), **base))
    assert blocks == [(1, 8)]  # dedup leaves 300 rows in one block; the tokenize stage gets 8 (4 per actor)
    monkeypatch.setattr(prepare, "use_actor_pool", lambda *args: True)
    pool = run(DataConfig(output_dir=str(tmp_path / "pool"), **base))

    def same(m):
        return {k: v for k, v in m.items() if k not in ("output_dir", "tokenizer_path", "rejects_file", "config", "config_hash", "seconds")}

    assert same(tasks) == same(pool)
    assert tasks["duplicates_removed"] == 5
    for split in ("train", "val"):  # the same sequences; their order in a shard follows the order blocks stream in
        rows = [sorted(map(str, read_split(tmp_path / name / split).to_pylist())) for name in ("tasks", "pool")]
        assert rows[0] and rows[0] == rows[1]
    assert (tmp_path / "tasks" / "tokenizer" / "tokenizer.json").read_bytes() == (tmp_path / "pool" / "tokenizer" / "tokenizer.json").read_bytes()
