"""Choices that keep a small prepare fast without changing what it writes."""

from rayllm.config.data import TokenizerConfig
from rayllm.data.prepare import use_actor_pool
from rayllm.data.tokenizer import checked, load_tokenizer, train_tokenizer


def test_actor_pool_only_when_more_than_one_block_feeds_it():
    assert not use_actor_pool(1_000_000, batch_size=2048, num_actors=2, blocks=1)  # one actor would do it all
    assert use_actor_pool(1_000_000, batch_size=2048, num_actors=2, blocks=2)
    assert not use_actor_pool(4096, batch_size=2048, num_actors=2, blocks=8)  # too few rows, however many blocks


def test_trained_tokenizer_gives_the_ids_a_reload_gives(tmp_path):
    cfg = TokenizerConfig(vocab_size=300, min_frequency=1)
    trained = checked(train_tokenizer([f"line {i} of a small corpus" for i in range(100)], cfg, tmp_path), tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (len(trained), trained.eos_token_id, trained.pad_token_id) == (len(loaded), loaded.eos_token_id, loaded.pad_token_id)
    assert trained("line 7 of a small corpus")["input_ids"] == loaded("line 7 of a small corpus")["input_ids"]
