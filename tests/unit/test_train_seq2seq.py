"""The seq2seq (T5) path without Ray: packed SFT rows → encoder/decoder examples, the T5 built from
`model.arch: t5`, its parameter count in the planner, and the preflight rules of seq2seq and QLoRA."""

import numpy as np
import pytest
import torch

from rayllm.config import ConfigError, LoraConfig, ModelConfig, parse_config
from rayllm.model import apply_lora, build_model, count_trainable, default_lora_targets, load_tokenizer
from rayllm.train import plan as P
from rayllm.train.data import IGNORE, PackedSplit
from rayllm.train.seq2seq import Seq2SeqSplit, examples_of_row, pad_examples
from tests.ray.train_fixtures import make_dataset, tiny_config

X = IGNORE


def test_each_conversation_of_a_row_is_one_example():
    # row: [fragment of an answer cut by the row boundary | conversation 1 | conversation 2 | padding]
    ids = np.array([7, 8, 1, 2, 3, 4, 5, 6, 9, 11, 12, 0, 0])
    labels = np.array([7, 8, X, X, X, 4, 5, X, 9, 11, 12, X, X])
    docs = np.array([0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, -1, -1])
    got = [(s.tolist(), t.tolist()) for s, t in examples_of_row(ids, labels, docs)]
    assert got == [([1, 2, 3], [4, 5]), ([6], [9, 11, 12])], "the answer-only fragment is not an example"


def test_padding_shifts_the_target_behind_the_start_token():
    batch = pad_examples([(np.array([1, 2, 3]), np.array([4, 5])), (np.array([6]), np.array([9, 10, 11]))], pad_id=0, start_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["decoder_input_ids"].tolist() == [[0, 4, 0], [0, 9, 10]]
    assert batch["labels"].tolist() == [[4, 5, X], [9, 10, 11]]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sft"), seq_len=64, n_docs=80, val_docs=10, mode="sft")


def test_seq2seq_split_counts_the_targets_it_trains(sft):
    rows = PackedSplit.read(sft, "train")
    split = Seq2SeqSplit(rows, pad_id=0, start_id=0)
    idx = np.arange(6)
    batch = split.batch(idx)
    assert len(split) == len(rows)
    assert split.target_tokens(idx) == int((batch["labels"] != X).sum()) > 0
    # every target token of the batch is a loss-carrying token of the packed rows
    assert split.target_tokens(idx) <= int((rows.labels[idx] != X).sum())


def test_t5_from_config_trains_a_step_and_matches_the_planner(sft):
    tok = load_tokenizer(sft / "tokenizer")
    cfg = ModelConfig(arch="t5", hidden_size=64, num_layers=2, num_heads=4)
    model = build_model(cfg, tok, seed=0)
    c = model.config
    assert c.is_encoder_decoder and (c.d_model, c.num_layers, c.num_decoder_layers, c.vocab_size) == (64, 2, 2, len(tok))
    assert c.decoder_start_token_id == c.pad_token_id == tok.pad_token_id
    shape = P.shape_from_hf(c.to_dict())
    assert count_trainable(model) == (shape.total_params, shape.total_params)

    targets = default_lora_targets(c.to_dict())
    assert targets == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    lora = apply_lora(model, LoraConfig(rank=4))
    assert count_trainable(lora)[0] == P.shape_from_hf(c.to_dict(), 4, tuple(targets)).trainable_params
    split = Seq2SeqSplit(PackedSplit.read(sft, "train"), c.pad_token_id, c.decoder_start_token_id)
    batch = split.batch(np.arange(4))
    logits = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=X)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in lora.parameters() if p.requires_grad)


def test_4bit_base_bytes_in_the_plan():
    shape = P.llama_shape(4096, 32, 32, 8, 14336, 128256, False, lora_rank=16,
                          lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    full = P.model_states(shape, P.Settings(stage=2, workers=1, micro_batch=1, seq_len=512, dtype_bytes=2))[0]["params"]
    q = P.model_states(shape, P.Settings(stage=2, workers=1, micro_batch=1, seq_len=512, dtype_bytes=2, quant_bits=4))[0]["params"]
    # Llama-3.1-8B: ~16 GB of bf16 weights become ~3.5 GB of NF4 linears + 2 GB of bf16 embeddings
    assert 14.5 < full / P.GIB < 15.5 and 5.0 < q / P.GIB < 6.0


def _problems(raw) -> str:
    from rayllm.train.preflight import preflight

    with pytest.raises(ConfigError) as err:
        preflight(parse_config(raw))
    return "\n".join(err.value.problems)


def test_seq2seq_and_qlora_rules_are_reported_before_ray(sft, tmp_path, monkeypatch):
    pretrain = make_dataset(tmp_path / "pretrain", seq_len=64, n_docs=60, val_docs=8)
    text = _problems(tiny_config(pretrain, tmp_path, model={"arch": "t5", "lora": {"target_modules": ["q_proj"]}}))
    assert "prepare it with data.mode: sft" in text
    assert "model.lora.target_modules" in text and "'wi_0'" in text

    monkeypatch.delenv("RAYLLM_QLORA_ON_CPU", raising=False)
    base = tmp_path / "base"
    tok = load_tokenizer(sft / "tokenizer")
    build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4), tok).save_pretrained(base)
    tok.save_pretrained(base)
    text = _problems(tiny_config(sft, tmp_path, zero_stage=3, model={"path": str(base), "quantization": "4bit", "lora": {}}))
    assert "QLoRA) is for GPU training" in text and "quantization: none" in text
    assert "zero_stage 3" in text and "use zero_stage 2" in text
