from rayllm.config.data import DataConfig
from rayllm.data.clean import clean_pretrain, clean_sft, clean_text, content_hash, parse_json_line, split_of, split_paragraphs


def cfg(**kw):
    return DataConfig(inputs=["x"], output_dir="o", **kw)


def test_clean_text_normalises_controls_and_whitespace():
    raw = "\ufeffＨｅｌｌｏ\u200b  \t world\r\n\r\n\r\n\r\nnext\x00 line \x07 "
    assert clean_text(raw) == "Hello world\n\nnext line"
    assert clean_text("Ｈｅｌｌｏ", normalize="none") == "Ｈｅｌｌｏ"
    assert clean_text("ﬁ", normalize="NFC") == "ﬁ" and clean_text("ﬁ", normalize="NFKC") == "fi"


def test_pretrain_rejects_by_reason():
    c = cfg(min_chars=5, max_chars=20, text_fields=["title", "body"])
    assert clean_pretrain({"title": "A title", "body": "and body"}, c).content == "A title\n\nand body"
    assert clean_pretrain({"other": "x"}, c).reject == "missing_field"
    assert clean_pretrain({"title": 3}, c).reject == "wrong_type"
    assert clean_pretrain({"title": " \x00 \u200b "}, c).reject == "empty"
    assert clean_pretrain({"title": "abc"}, c).reject == "too_short"
    assert clean_pretrain({"title": "x" * 21}, c).reject == "too_long"
    assert clean_pretrain([1, 2], c).reject == "invalid_json"
    assert clean_pretrain("plain text document", c).content == "plain text document"


def test_sft_accepts_messages_and_pairs_and_rejects_bad_conversations():
    c = cfg(mode="sft", system_prompt="Be brief.")
    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}]
    assert '"content": "hi"' in clean_sft({"messages": msgs}, c).content
    pair = clean_sft({"prompt": "q", "response": "a"}, c)
    assert '"Be brief."' in pair.content and '"assistant"' in pair.content
    assert clean_sft({"messages": [{"role": "user", "content": "only a question"}]}, c).reject == "bad_messages"
    assert clean_sft({"messages": [{"role": "robot", "content": "x"}]}, c).reject == "bad_messages"
    assert clean_sft({"messages": "not json"}, c).reject == "wrong_type"
    assert clean_sft({"prompt": 1, "response": "a"}, c).reject == "wrong_type"
    assert clean_sft({"text": "x"}, c).reject == "missing_field"


def test_hash_identifies_exact_duplicates_after_cleaning():
    a = clean_pretrain("Hello   world", cfg()).content
    b = clean_pretrain("Hello world\n", cfg()).content
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash("Hello world!")


def test_split_is_deterministic_and_close_to_the_fraction():
    digests = [content_hash(f"doc {i}") for i in range(20000)]
    first = [split_of(d, 0.1, "s") for d in digests]
    assert first == [split_of(d, 0.1, "s") for d in digests]
    share = first.count("val") / len(first)
    assert 0.09 < share < 0.11
    assert [split_of(d, 0.1, "other") for d in digests] != first  # the salt draws another split
    assert all(split_of(d, 0.0, "s") == "train" for d in digests[:100])


def test_json_lines_and_paragraphs():
    assert parse_json_line('{"a": 1}') == ({"a": 1}, "")
    record, problem = parse_json_line("{broken")
    assert record is None and "invalid JSON" in problem
    assert split_paragraphs("one\nstill one\n\n  \ntwo\r\n\r\nthree") == ["one\nstill one", "two", "three"]


def test_drop_duplicates_keeps_one_copy_per_hash_in_order():
    import numpy as np

    from rayllm.data.prepare import _drop_duplicates

    block = {"hash": np.array(["b", "a", "b", "c", "a"], dtype=object), "content": np.array(["1", "2", "3", "4", "5"], dtype=object)}
    out = _drop_duplicates(block)
    assert out["hash"].tolist() == ["b", "a", "c"] and out["content"].tolist() == ["1", "2", "4"]


def test_block_rejects_counts_every_reason_and_caps_samples():
    import json

    import numpy as np

    from rayllm.data.prepare import _block_rejects

    block = {"reject": np.array(["", "too_long", "", "empty", "too_long"], dtype=object),
             "detail": np.array(["", "d1", "", "d2", "d3"], dtype=object), "raw": np.array(["", "r1", "", "r2", "r3"], dtype=object)}
    rows = _block_rejects(block, limit=1).to_pylist()
    assert [(r["reason"], r["n"]) for r in rows] == [("empty", 1), ("too_long", 2)]
    assert json.loads(rows[1]["samples"]) == [{"reason": "too_long", "detail": "d1", "raw": "r1"}]
    assert _block_rejects({k: v[:1] for k, v in block.items()}, limit=1).num_rows == 0  # typed, even when empty


def test_actor_pool_only_when_every_actor_gets_more_than_two_batches():
    from rayllm.data.prepare import use_actor_pool

    assert not use_actor_pool(8192, batch_size=2048, num_actors=2)
    assert use_actor_pool(8193, batch_size=2048, num_actors=2)
    assert use_actor_pool(300, batch_size=7, num_actors=2)
