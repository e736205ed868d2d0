"""The seq2seq (T5-style) path on 2 CPU workers: a T5 built from `model.arch: t5` trains on SFT
pairs (prompt → encoder, answer → decoder) and hands on an HF folder; that folder is then fine-tuned
as a local base with LoRA under ZeRO-3, and the adapter is a PEFT seq2seq adapter that loads on it."""

import json

import pytest
import torch

from tests.ray.train_fixtures import make_dataset, step_losses, tiny_config, train  # noqa: F401

pytestmark = pytest.mark.slow
T5 = {"arch": "t5", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "dtype": "float32"}


@pytest.fixture(scope="module")
def sft_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sft"), seq_len=64, n_docs=300, val_docs=40, mode="sft")


@pytest.mark.timeout(420)
def test_t5_trains_from_scratch_then_lora_finetunes_its_folder(ray_local, sft_dataset, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    full = train(tiny_config(sft_dataset, tmp_path, run_name="t5-full", max_steps=16, save_every=8, eval_every=8,
                             learning_rate=3e-3, model=T5))
    losses = step_losses(tmp_path / "t5-full")
    assert full["status"] == "finished" and sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 1.0, f"loss did not fall: {losses}"
    model_dir = tmp_path / "t5-full" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "t5" and config["is_encoder_decoder"]

    # The exported folder is a plain HF T5: it loads and its loss on a training pair matches the run's.
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert base.config.decoder_start_token_id == tok.pad_token_id

    lora = train(tiny_config(sft_dataset, tmp_path, run_name="t5-lora", max_steps=8, save_every=8, eval_every=8,
                             learning_rate=1e-2, zero_stage=3,
                             model={"path": str(model_dir), "dtype": "float32", "lora": {"rank": 4}}))
    assert lora["status"] == "finished" and lora["trainable_params"] < lora["total_params"] / 5
    lora_losses = step_losses(tmp_path / "t5-lora")
    assert sorted(lora_losses) == list(range(1, 9))
    assert lora_losses[1] < losses[1] - 1.0, "the LoRA run starts from the trained base, not from scratch"

    adapter = tmp_path / "t5-lora" / "adapter"
    peft_cfg = PeftConfig.from_pretrained(adapter)
    assert peft_cfg.task_type == "SEQ_2_SEQ_LM"
    assert set(peft_cfg.target_modules) == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}, "empty target_modules: all T5 projections"
    meta = json.loads((adapter / "rayllm_adapter.json").read_text())
    assert meta["target_modules"] == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"] and meta["rank"] == 4

    prompt = tok.apply_chat_template([{"role": "user", "content": "the cat sees a red ball?"}], tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    start = torch.tensor([[base.config.decoder_start_token_id]])
    with torch.no_grad():
        plain = base.generate(**enc, max_new_tokens=6, do_sample=False)
        before = base(**enc, decoder_input_ids=start).logits
        tuned_model = PeftModel.from_pretrained(base, str(adapter)).eval()  # injects the LoRA layers into base
        with tuned_model.disable_adapter():
            same = tuned_model(**enc, decoder_input_ids=start).logits
        after = tuned_model(**enc, decoder_input_ids=start).logits
    assert plain.shape[1] > 1, "the trained base generates"
    assert torch.allclose(before, same, atol=1e-5) and not torch.allclose(before, after, atol=1e-4)
