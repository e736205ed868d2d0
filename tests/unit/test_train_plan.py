"""The memory planner: parameter counts, bytes per worker against DeepSpeed's estimators, and refusals."""

from dataclasses import replace

import pytest

from rayllm.config import ConfigError, parse_config
from rayllm.train import plan as P
from tests.ray.train_fixtures import make_dataset, tiny_config

GIB = P.GIB
# Three sizes: a tiny test model, SmolLM2-135M's shape, and a Llama-2-7B-like shape.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=4, ffn=192, vocab=512, tied=True),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152, tied=True),
    "llama-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000, tied=False),
}
TOLERANCE = 0.01  # ours vs DeepSpeed's model-state figures, relative


def settings(**kw):
    base = dict(stage=2, workers=2, micro_batch=1, seq_len=128, dtype_bytes=2)
    return P.Settings(**{**base, **kw})


def test_known_parameter_counts():
    assert P.llama_shape(**SIZES["smollm2-135m"]).total_params == 134_515_008  # SmolLM2-135M's published count
    assert P.llama_shape(**SIZES["llama-7b"]).total_params == 6_738_415_616  # Llama-2-7B's published count


def test_shape_matches_a_real_model_as_deepspeed_counts_it():
    """Analytic counts = what DeepSpeed's `_live` estimators derive from a built model."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES["tiny"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], tie_word_embeddings=True))
    total, largest = model_to_params(model)
    shape = P.llama_shape(**s)
    assert (shape.total_params, shape.largest_layer_params) == (total, largest)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("stage,offload_opt,offload_param", [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)])
def test_model_states_agree_with_deepspeed(size, stage, offload_opt, offload_param):
    shape = P.llama_shape(**SIZES[size])
    s = settings(stage=stage, offload_optimizer=offload_opt, offload_param=offload_param)
    device, host = P.model_states(shape, s)
    ds_device, ds_host_per_node = P.deepspeed_model_states(shape, s)
    assert sum(device.values()) == pytest.approx(ds_device, rel=TOLERANCE)
    if offload_opt:  # without offload DeepSpeed's host figure is load-time memory, not a training state
        assert sum(host.values()) * s.workers == pytest.approx(ds_host_per_node, rel=TOLERANCE)


def test_sharding_and_offload_move_memory_where_expected():
    shape = P.llama_shape(**SIZES["llama-7b"])
    totals = [sum(P.model_states(shape, settings(stage=st, dtype_bytes=4, workers=8))[0].values()) for st in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True) and totals[3] < totals[0] / 3
    dev, host = P.model_states(shape, settings(stage=3, offload_optimizer=True, offload_param=True))
    assert dev == {"params": 4 * shape.largest_layer_params} and host["optimizer"] == 16 * shape.trainable_params / 2
    lora = P.llama_shape(**SIZES["llama-7b"], lora_rank=8, lora_targets=("q_proj", "v_proj"))
    assert lora.trainable_params == 32 * 2 * 8 * (4096 + 4096)
    # LoRA: the frozen 16-bit base dominates; grads and Adam states exist only for the adapters
    assert sum(P.model_states(lora, settings())[0].values()) == pytest.approx(2 * lora.total_params, rel=0.01)


def test_activations_shrink_with_checkpointing_and_grow_with_batch():
    shape = P.llama_shape(**SIZES["llama-7b"])
    a = P.activation_bytes(shape, settings(micro_batch=4))
    assert P.activation_bytes(shape, settings(micro_batch=8)) == pytest.approx(2 * a)
    assert P.activation_bytes(shape, settings(micro_batch=4, gradient_checkpointing=True)) < a / 3


def test_fits_on_cpu_counts_device_and_host_as_one_ram():
    shape = P.llama_shape(**SIZES["smollm2-135m"])
    s = settings(stage=2, offload_optimizer=True, dtype_bytes=4)
    plan = P.plan_memory(shape, s)
    need = plan.device_total + plan.host_total
    assert P.fits(plan, s, (None, need)) and not P.fits(plan, s, (None, need * 0.99))
    gpu = replace(s, use_gpu=True)
    assert P.fits(P.plan_memory(shape, gpu), gpu, (P.plan_memory(shape, gpu).device_total, None))


def test_suggestions_name_keys_that_would_fit():
    shape = P.llama_shape(**SIZES["llama-7b"])
    s = settings(stage=2, workers=2, micro_batch=8, seq_len=2048, use_gpu=True)
    capacity = lambda workers: (40 * GIB, 500 * GIB)  # noqa: E731
    assert not P.fits(P.plan_memory(shape, s), s, capacity(2))
    found = P.suggestions(shape, s, capacity)
    assert found and all("train." in f for f in found)
    assert any("train.zero_stage: 3" in f for f in found)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), seq_len=64, n_docs=60, val_docs=20)


def test_plan_main_and_run_refuse_an_impossible_config_before_ray(dataset, tmp_path, capsys):
    import ray

    from rayllm.train.launch import plan_main, run

    raw = tiny_config(dataset, tmp_path, model={"hidden_size": 8192, "num_layers": 48, "num_heads": 64})
    cfg = parse_config(raw)
    assert plan_main(cfg) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "DeepSpeed's estimator" in out
    with pytest.raises(ConfigError, match="does not fit|more than there is"):
        run(cfg)
    capsys.readouterr()
    assert not ray.is_initialized() and not (tmp_path / "run").exists()

    small = parse_config(tiny_config(dataset, tmp_path, memory_per_worker_gib=3.6, micro_batch_size=2, zero_stage=0,
                                     model={"hidden_size": 1024, "num_layers": 16, "num_heads": 16}))
    assert plan_main(small) == 1
    assert "would fit: train.zero_stage" in capsys.readouterr().out
    ok = parse_config(tiny_config(dataset, tmp_path))
    assert plan_main(ok) == 0


def test_preflight_reports_every_problem_at_once(dataset, tmp_path):
    from rayllm.train.preflight import preflight

    raw = tiny_config(dataset, tmp_path, micro_batch_size=64, model={"max_position_embeddings": 32, "quantization": "4bit",
                                                                      "path": str(tmp_path / "nope"), "lora": {}})
    with pytest.raises(ConfigError) as err:
        preflight(parse_config(raw))
    text = "\n".join(err.value.problems)
    assert "QLoRA" in text and "model.path" in text and "micro_batch_size" in text
