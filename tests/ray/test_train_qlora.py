"""QLoRA on 2 CPU workers: the base is loaded as bitsandbytes NF4 (its CPU backend stands in for the
GPU kernels; `rayllm train` refuses 4-bit on CPU unless the test hook is set), LoRA trains on top
under ZeRO-2, and the adapter it hands on loads onto the full-precision base."""

import json

import pytest
import torch

from rayllm.config import ModelConfig
from rayllm.model import build_model, load_model, load_tokenizer
from rayllm.train.plan import shape_from_hf
from rayllm.train.preflight import QLORA_ON_CPU_ENV
from tests.ray.train_fixtures import read_metrics, step_losses, tiny_config, tiny_dataset, train  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_qlora_trains_an_adapter_on_a_4bit_base(ray_local, tiny_dataset, tmp_path, monkeypatch):
    from peft import PeftModel

    tokenizer = load_tokenizer(tiny_dataset / "tokenizer")
    base_dir = tmp_path / "base"
    build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128), tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    monkeypatch.setenv(QLORA_ON_CPU_ENV, "1")
    raw = tiny_config(tiny_dataset, tmp_path, run_name="qlora", max_steps=8, save_every=4, eval_every=4, learning_rate=1e-2,
                      model={"path": str(base_dir), "dtype": "float32", "quantization": "4bit", "lora": {"rank": 4}})
    result = train(raw)
    losses = step_losses(tmp_path / "qlora")
    assert result["status"] == "finished" and sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1], f"loss did not fall: {losses}"
    start = next(m for m in read_metrics(tmp_path / "qlora") if m.get("event") == "start")
    assert start["quantized_modules"] == 2 * 7, "every projection of both layers is a 4-bit Linear"
    shape = shape_from_hf(json.loads((base_dir / "config.json").read_text()), 4,
                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert (result["trainable_params"], result["total_params"]) == (shape.trainable_params, shape.total_params)

    adapter = tmp_path / "qlora" / "adapter"
    base = load_model(base_dir)
    ids = torch.tensor([tokenizer("the cat sees a red ball.")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(adapter))(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4), "the trained adapter changes the full-precision base"
