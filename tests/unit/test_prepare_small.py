"""Choices that keep a small prepare fast without changing what it writes."""

from rayllm.config.data import TokenizerConfig
from rayllm.data.prepare import blocks_wanted
from rayllm.data.tokenizer import checked, load_tokenizer, train_tokenizer


def test_the_tokenize_stage_gets_a_block_per_batch_up_to_four_per_actor():
    assert blocks_wanted(1_000, batch_size=2048, num_actors=2) == 1  # one batch: nothing to spread
    assert blocks_wanted(4_288, batch_size=2048, num_actors=2) == 3  # the demo's corpus: parallel tasks
    assert blocks_wanted(1_000_000, batch_size=2048, num_actors=2) == 8  # every actor busy, a small tail
    assert blocks_wanted(1_000_000, batch_size=2048, num_actors=16) == 64


def test_trained_tokenizer_gives_the_ids_a_reload_gives(tmp_path):
    cfg = TokenizerConfig(vocab_size=300, min_frequency=1)
    trained = checked(train_tokenizer([f"line {i} of a small corpus" for i in range(100)], cfg, tmp_path), tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (len(trained), trained.eos_token_id, trained.pad_token_id) == (len(loaded), loaded.eos_token_id, loaded.pad_token_id)
    assert trained("line 7 of a small corpus")["input_ids"] == loaded("line 7 of a small corpus")["input_ids"]
