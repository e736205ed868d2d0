"""The one dtype rule (rayllm.dtypes) and the three places that use it: preflight, the workers, vLLM."""

import pytest

from rayllm import dtypes
from rayllm.config import ConfigError, parse_config
from rayllm.dtypes import resolve_dtype


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(dtypes, "bf16_supported", lambda use_gpu: False)


@pytest.fixture
def has_bf16(monkeypatch):
    monkeypatch.setattr(dtypes, "bf16_supported", lambda use_gpu: True)


def test_auto_is_fp32_where_bf16_is_slow(no_bf16):
    assert resolve_dtype("auto", use_gpu=False) == "float32"
    assert resolve_dtype("auto", use_gpu=True) == "float32"


def test_auto_is_bf16_where_it_runs_fast(has_bf16):
    assert resolve_dtype("auto", use_gpu=False) == "bfloat16"


def test_explicit_values_pass_through(no_bf16):
    assert resolve_dtype("float32", use_gpu=False) == "float32"
    assert resolve_dtype("float16", use_gpu=True) == "float16"
    assert resolve_dtype("bfloat16", use_gpu=True) == "bfloat16"  # a GPU's support is checked by preflight


def test_bf16_requested_on_a_cpu_without_it_is_an_error_naming_the_key(no_bf16):
    with pytest.raises(ValueError, match=r"^model\.dtype: bfloat16 requested but this CPU has no bf16 instructions"):
        resolve_dtype("bfloat16", use_gpu=False)
    with pytest.raises(ValueError, match=r"^serve\.dtype: .*use dtype: auto or float32"):
        resolve_dtype("bfloat16", use_gpu=False, key="serve.dtype")


def test_a_given_answer_is_used_instead_of_asking_this_machine(monkeypatch):
    def ask(use_gpu):
        raise AssertionError("the hardware was asked although the caller knew the answer")

    monkeypatch.setattr(dtypes, "bf16_supported", ask)
    assert resolve_dtype("auto", use_gpu=False, bf16_ok=False) == "float32"
    assert resolve_dtype("auto", use_gpu=True, bf16_ok=True) == "bfloat16"
    assert resolve_dtype("bfloat16", use_gpu=False, bf16_ok=True) == "bfloat16"
    assert resolve_dtype("float32", use_gpu=False) == "float32"  # nothing to ask


def test_the_hardware_answers_are_plain_values():
    assert isinstance(dtypes.bf16_supported(False), bool)
    assert isinstance(dtypes.cpu_capability(), str) and dtypes.cpu_capability()


def test_an_avx512_cpu_without_bf16_instructions_computes_in_fp32(monkeypatch):
    """oneDNN says bf16 is supported on any AVX-512 CPU; only AVX-512 BF16 or AMX run it at speed."""
    import torch

    monkeypatch.setattr(dtypes.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert dtypes.bf16_supported(False) is expected
        assert resolve_dtype("auto", use_gpu=False) == ("bfloat16" if expected else "float32")


def test_serving_keeps_vllms_auto_on_gpu_and_the_shared_rule_on_cpu(no_bf16):
    from rayllm.serve.vllm_engine import resolve_dtype as engine_dtype

    assert engine_dtype("auto", on_gpu=True) == "auto"
    assert engine_dtype("auto", on_gpu=False) == "float32"
    with pytest.raises(ValueError, match=r"^serve\.dtype: bfloat16 requested"):
        engine_dtype("bfloat16", on_gpu=False)


def test_preflight_reports_bf16_on_a_slow_cpu_with_the_other_problems(no_bf16, tmp_path):
    from rayllm.train.preflight import preflight

    cfg = parse_config({"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "dtype": "bfloat16"},
                        "train": {"dataset": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    text = "\n".join(err.value.problems)
    assert "model.dtype: bfloat16 is not supported at speed on this CPU" in text and "train.dataset" in text


def test_workers_agree_on_one_dtype(has_bf16, tmp_path):
    import torch
    import torch.distributed as dist

    from rayllm.train.worker import agreed_dtype

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert agreed_dtype("auto", use_gpu=False, device=torch.device("cpu")) == "bfloat16"
        assert agreed_dtype("float32", use_gpu=False, device=torch.device("cpu")) == "float32"
    finally:
        dist.destroy_process_group()


def test_amx_permission_is_requested_in_every_vllm_process():
    """vLLM calls every `vllm.general_plugins` entry point in each process it starts; rayllm's asks for
    AMX tile permission there (without it a bf16 worker on an AMX CPU dies with SIGILL)."""
    from importlib.metadata import entry_points
    from pathlib import Path

    from rayllm.dtypes import allow_amx

    assert "rayllm.dtypes:allow_amx" in {e.value for e in entry_points(group="vllm.general_plugins")}
    cpuinfo = Path("/proc/cpuinfo")
    has_amx = cpuinfo.exists() and " amx_tile" in cpuinfo.read_text()
    assert allow_amx() is has_amx  # granted where the CPU has AMX, a harmless False elsewhere
