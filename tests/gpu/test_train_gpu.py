"""GPU paths of training, run only where a CUDA GPU is present: bf16 ZeRO-3 on NCCL with MFU in the
metrics, and QLoRA (NF4 base on the GPU, LoRA on top)."""

import pytest

from rayllm.config import ModelConfig
from rayllm.model import build_model, load_tokenizer
from tests.ray.train_fixtures import read_metrics, step_losses, tiny_config, tiny_dataset, train  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
GPU = {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 1}


@pytest.mark.timeout(300)
def test_bf16_zero3_on_gpu(ray_local, tiny_dataset, tmp_path):
    result = train(tiny_config(tiny_dataset, tmp_path, run_name="gpu-z3", zero_stage=3, **GPU,
                               model={"dtype": "bfloat16", "hidden_size": 128, "num_heads": 4}))
    losses = step_losses(tmp_path / "gpu-z3")
    assert result["status"] == "finished" and result["dtype"] == "bfloat16"
    assert losses[12] < losses[1] - 1.0, losses
    steps = [m for m in read_metrics(tmp_path / "gpu-z3") if "loss" in m and "event" not in m]
    assert all(0 < m["mfu"] < 1 for m in steps) and all(m["peak_mem_gib"] > 0 for m in steps)
    assert (tmp_path / "gpu-z3" / "model" / "config.json").is_file()


@pytest.mark.timeout(300)
def test_qlora_on_gpu(ray_local, tiny_dataset, tmp_path):
    tokenizer = load_tokenizer(tiny_dataset / "tokenizer")
    base = tmp_path / "base"
    build_model(ModelConfig(hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=128), tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    result = train(tiny_config(tiny_dataset, tmp_path, run_name="gpu-qlora", zero_stage=2, learning_rate=1e-2, **GPU,
                               model={"path": str(base), "dtype": "bfloat16", "quantization": "4bit", "lora": {"rank": 8}}))
    losses = step_losses(tmp_path / "gpu-qlora")
    assert result["status"] == "finished" and losses[12] < losses[1], losses
    start = next(m for m in read_metrics(tmp_path / "gpu-qlora") if m.get("event") == "start")
    assert start["quantized_modules"] == 14
    assert (tmp_path / "gpu-qlora" / "adapter" / "adapter_model.safetensors").is_file()
