"""`train:` and `model:` sections: documented fields, and invalid combinations rejected with the key and the fix."""

import pytest

from rayllm.config import ConfigError, LoraConfig, ModelConfig, TrainConfig, parse_config
from rayllm.config.train import SpikeConfig


@pytest.mark.parametrize("section", [TrainConfig, ModelConfig, LoraConfig, SpikeConfig])
def test_every_field_has_a_description(section):
    missing = [name for name, f in section.model_fields.items() if not f.description]
    assert not missing


def problems(**train):
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"dataset": "d", **train}})
    return "\n".join(err.value.problems)


def test_offload_and_nvme_rules():
    assert "needs zero_stage 3" in problems(offload_param="cpu", zero_stage=2)
    assert "zero_stage >= 1" in problems(offload_optimizer="cpu", zero_stage=0)
    text = problems(offload_optimizer="nvme", zero_stage=2)
    assert "use_gpu: true" in text and "offload_optimizer" in text
    assert "nvme_path" in problems(offload_optimizer="nvme", zero_stage=2, use_gpu=True)
    parse_config({"train": {"dataset": "d", "zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}})


def test_schedule_and_stop_rules():
    assert "warmup_steps (20) exceeds max_steps (10)" in problems(warmup_steps=20, max_steps=10)
    assert "stop_at_step (11) exceeds max_steps (10)" in problems(stop_at_step=11, max_steps=10)


def test_unknown_keys_and_bad_values_are_named():
    text = problems(zero_stage=4, micro_batch=3)
    assert "train.zero_stage" in text and "train.micro_batch: unknown key" in text and "micro_batch_size" in text


def test_model_rules():
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"hidden_size": 100, "num_heads": 3, "quantization": "4bit"}})
    text = "\n".join(err.value.problems)
    assert "divisible by num_heads" in text and "needs a lora section" in text and "needs path" in text
    assert ModelConfig(hidden_size=576).ffn_size == 1536 and ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2).kv_heads == 2
