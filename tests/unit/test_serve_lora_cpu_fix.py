"""The vLLM plugin's CPU LoRA ops: same results as vLLM's where every row has an adapter, and rows
without one (index -1) untouched instead of getting the last adapter slot."""

from __future__ import annotations

import pytest
import torch

from rayllm.serve import lora_cpu_fix as fix

ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


class vllm_ops:
    """vLLM's own functions, also when the plugin already patched this process."""

    def __getattr__(self, name):
        return fix.ORIGINALS.get(name) or getattr(ops, name)


vllm = vllm_ops()


def tensors(rows=7, slots=3, d_in=16, d_out=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=g)
    w = torch.randn(slots, 1, d_out, d_in, generator=g)  # vLLM stacks (slots, 1, out, in)
    return x, w


ROWS = pytest.mark.parametrize("rows", [7, 64], ids=["decode-sized (gather)", "prefill-sized (GEMM per adapter)"])


@ROWS
def test_shrink_and_expand_match_vllm_when_every_row_has_an_adapter(rows):
    x, w = tensors(rows=rows)
    idx = torch.arange(rows) * 7 % 3
    for add in (True, False):
        ref, out = torch.ones(rows, 12), torch.ones(rows, 12)
        vllm.bgmv_expand(x, w, ref, idx, add_inputs=add)
        fix.bgmv_expand(x, w, out, idx, add_inputs=add)
        torch.testing.assert_close(out, ref)
    ref, out = torch.zeros(rows, 12), torch.zeros(rows, 12)
    vllm.bgmv_shrink(x, w, ref, idx, 0.5)
    fix.bgmv_shrink(x, w, out, idx, 0.5)
    torch.testing.assert_close(out, ref)
    ref, out = torch.ones(rows, 30), torch.ones(rows, 30)
    vllm.bgmv_expand_slice(x, w, ref, idx, 5, 12, True)
    fix.bgmv_expand_slice(x, w, out, idx, 5, 12, True)
    torch.testing.assert_close(out, ref)


@ROWS
def test_rows_without_an_adapter_are_left_alone(rows):
    x, w = tensors(rows=rows)
    idx = torch.arange(rows) % 4 - 1  # -1, 0, 1, 2, -1, ...
    base = torch.randn(rows, 12)
    buggy, fixed = base.clone(), base.clone()
    vllm.bgmv_expand(x, w, buggy, idx, add_inputs=True)
    fix.bgmv_expand(x, w, fixed, idx, add_inputs=True)
    none = idx < 0
    assert not torch.allclose(buggy[none], base[none])  # vLLM's bug: -1 picks the last slot
    torch.testing.assert_close(fixed[none], base[none])
    torch.testing.assert_close(fixed[~none], buggy[~none])
    # the sgmv (prefill) path goes through the module's bgmv functions
    out = base.clone()
    fixed_slice = base.clone()
    fix.bgmv_expand_slice(x, w, fixed_slice, idx, 0, 12, True)
    torch.testing.assert_close(fixed_slice, fixed)
    shrunk = torch.full((rows, 12), 9.0)
    fix.bgmv_shrink(x, w, shrunk, idx, 1.0)
    assert (shrunk[none] == 0).all()
    del out


def test_register_patches_every_binding(monkeypatch):
    import vllm.lora.ops.torch_ops as pkg
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (ops, pkg, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setenv("RAYLLM_LORA_CPU_FIX", "1")
    fix.register()
    assert fix.is_active()
    assert punica_cpu.bgmv_expand is fix.bgmv_expand and pkg.bgmv_shrink is fix.bgmv_shrink


def test_the_plugin_is_declared_for_vllm():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "rayllm.serve.lora_cpu_fix:register" in names


def test_prompt_logprob_rows_of_one_request_do_not_crash():
    """vLLM computes prompt logprobs per request with the whole batch's indices (rows != indices):
    vLLM's ops crash the engine there; the fix returns the exact zero delta of adapters that have no
    weights on the layer, and the one adapter's delta when the whole batch uses the same adapter."""
    x, w = tensors(rows=5)
    zero_w = torch.zeros_like(w)
    batch_indices = torch.tensor([-1, 1, 0])  # three requests in the batch, five prompt rows of one of them
    with pytest.raises(RuntimeError):
        vllm.bgmv_shrink(x, zero_w, torch.zeros(5, 12), batch_indices, 1.0)
    out = torch.full((5, 12), 3.0)
    fix.bgmv_expand(x, zero_w, out, batch_indices, add_inputs=True)
    assert (out == 3.0).all()
    same = torch.tensor([2, 2, 2])
    out, ref = torch.zeros(5, 12), torch.zeros(5, 12)
    fix.bgmv_expand(x, w, out, same, add_inputs=True)
    vllm.bgmv_expand(x, w, ref, torch.full((5,), 2), add_inputs=True)
    torch.testing.assert_close(out, ref)
    with pytest.raises(RuntimeError, match="lm_head"):
        fix.bgmv_expand(x, w, out, batch_indices, add_inputs=True)
