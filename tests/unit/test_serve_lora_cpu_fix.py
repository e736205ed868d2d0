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


def reference(x, w, idx):
    """Per row: x[i] @ w[idx[i]].T, zero for rows without an adapter (fp32, one row at a time)."""
    w = w.squeeze(1)
    return torch.stack([x[i] @ w[s].T if s >= 0 else torch.zeros(w.shape[1]) for i, s in enumerate(idx.tolist())])


PLANS = pytest.mark.parametrize("idx, kind", [
    (torch.full((8,), -1), "none"),
    (torch.full((8,), 5), "one"),
    (torch.arange(8), "grouped"),  # decode: 8 requests on 8 adapters
    (torch.tensor([3, -1, 3, 4, -1, 4, 3, 4]), "grouped"),  # decode with base rows
    (torch.tensor([2] * 40 + [-1] * 20 + [7] * 4), "per_adapter"),  # prefill: long runs per adapter
    (torch.tensor([0, 7, 7, 1, 2, -1, 7, 3, 7, 4, 5, 7, 6] + [7] * 5), "grouped"),  # decode + a joining prompt
], ids=["all-base", "single adapter", "mixed decode", "mixed decode with base rows", "mixed prefill",
        "mixed decode with a prompt"])


@PLANS
def test_planned_shrink_and_expand_equal_the_per_row_reference(idx, kind):
    from types import SimpleNamespace

    rows = idx.shape[0]
    g = torch.Generator().manual_seed(1)
    x, a, b = torch.randn(rows, 16, generator=g), torch.randn(8, 1, 4, 16, generator=g), torch.randn(8, 1, 30, 4, generator=g)
    punica = SimpleNamespace(token_lora_indices=idx, _rayllm_plan=fix._Plan(idx))
    assert punica._rayllm_plan.kind == kind
    buf = torch.zeros(rows, 4)
    fix._shrink(punica, buf, x, a, 0.5)
    torch.testing.assert_close(buf, 0.5 * reference(x, a, idx), rtol=1e-6, atol=1e-6)
    y = torch.randn(rows, 40, generator=g)
    for add in (True, False):
        out = y.clone()
        fix._expand_slice(punica, out, buf, b, 6, 30, add)
        delta = reference(buf, b, idx)
        want = y.clone()
        has = idx >= 0
        want[:, 6:36] = y[:, 6:36] + delta if add else torch.where(has[:, None], delta, y[:, 6:36])
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    out = y.clone()
    fix._expand(punica, out, buf, b, True)  # the embedding path: no slice, output narrower than the weights
    want = y.clone()
    want[:, :30] += reference(buf, b, idx)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_a_plan_for_other_rows_falls_back_to_the_fixed_bgmv_ops():
    from types import SimpleNamespace

    x, w = tensors(rows=6)
    idx = torch.tensor([0, -1, 2, 2, 1, -1])
    punica = SimpleNamespace(token_lora_indices=idx, _rayllm_plan=fix._Plan(torch.arange(8)))
    out = torch.zeros(6, 12)
    fix._shrink(punica, out, x, w, 1.0)
    torch.testing.assert_close(out, reference(x, w, idx), rtol=1e-6, atol=1e-6)


def test_one_input_row_broadcast_to_every_index():
    """vLLM's bgmv broadcast case: one input row, one index per output row."""
    x, w = tensors(rows=1)
    idx = torch.tensor([1, -1, 0])
    out = torch.zeros(3, 12)
    fix.bgmv_expand(x, w, out, idx, add_inputs=True)
    torch.testing.assert_close(out, reference(x.expand(3, -1), w, idx))


def test_vllm_punica_wrapper_builds_the_plan_once_per_mapping_and_uses_it():
    """Through vLLM's own PunicaWrapperCPU: the metadata update makes the plan, add_lora_linear uses it
    (a mixed decode batch on three adapters and base rows, qkv-like three slices) and matches vLLM's
    ops on the rows with an adapter and leaves the base rows alone."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    fix.register()
    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    ids = (3, 0, 1, 2, 1, 0, 3, 3)  # lora ids per token; 0 = no adapter
    punica.update_metadata(LoRAMapping(ids, ids, is_prefill=True), [1, 2, 3, None], 4, 100)
    plan = punica._rayllm_plan
    assert plan.kind == "grouped" and plan.rows == 8
    idx = punica.token_lora_indices
    assert idx.tolist() == [2, -1, 0, 1, 0, -1, 2, 2]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, generator=g)
    a = tuple(torch.randn(4, 1, 4, 16, generator=g) for _ in range(3))
    b = tuple(torch.randn(4, 1, n, 4, generator=g) for n in (10, 5, 5))
    y = torch.randn(8, 20, generator=g)
    out = y.clone()
    punica.add_lora_linear(out, x, a, b, 1.0, (10, 5, 5))
    want, offset = y.clone(), 0
    for ai, bi, n in zip(a, b, (10, 5, 5)):
        want[:, offset: offset + n] += reference(reference(x, ai, idx), bi, idx)
        offset += n
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[idx < 0], y[idx < 0])


@pytest.mark.parametrize("ids", [(1, 3, 3, 2, 3, 0, 3, 3, 3), (2, 1, 3, 1, 2), (1, 2, 3)],
                         ids=["decode rows and a prompt", "grid with padding", "rows in slot order"])
def test_every_row_of_a_mixed_batch_gets_what_its_request_gets_alone(ids):
    """Isolation: a request's rows get the delta they get when the request runs alone (kind `one`): bit
    for bit where the batch gives them a product of their own (the same product on the same rows), up
    to fp32 rounding where they went into the grid (a bmm, alone a matmul); base rows are untouched."""
    g = torch.Generator().manual_seed(4)
    a = tuple(torch.randn(4, 1, 4, 16, generator=g) for _ in range(3))
    b = tuple(torch.randn(4, 1, n, 4, generator=g) for n in (10, 5, 5))
    x, y = torch.randn(len(ids), 16, generator=g), torch.randn(len(ids), 20, generator=g)
    state = ((1, 1, 1), (4, 4, 4), (False,) * 3)
    out, batch = y.clone(), _wrapper_with(ids, state)
    batch.add_lora_linear(out, x, a, b, 0.5, (10, 5, 5))
    own = {slot for slot, _ in batch._rayllm_plan.groups}
    assert own == ({2} if len(ids) == 9 else set())
    for lora in set(ids) - {0}:
        rows = [i for i, v in enumerate(ids) if v == lora]
        alone = y[rows].clone()
        punica = _wrapper_with(tuple(lora for _ in rows), state)
        assert punica._rayllm_plan.kind == "one"
        punica.add_lora_linear(alone, x[rows], a, b, 0.5, (10, 5, 5))
        if lora - 1 in own:
            assert torch.equal(out[rows], alone), lora
        torch.testing.assert_close(out[rows], alone, rtol=1e-6, atol=1e-6)
    base = [i for i, v in enumerate(ids) if v == 0]
    assert torch.equal(out[base], y[base])


def _wrapper_with(ids, slots):
    """vLLM's PunicaWrapperCPU after a metadata update for lora ids per token, with the slot state
    (generation, rank, logits LoRA per slot) that activating the adapters records."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    fix.register()
    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    punica.update_metadata(LoRAMapping(ids, ids, is_prefill=len(ids) > 8), [1, 2, 3, None], 4, 100)
    punica._rayllm_slots = slots
    return punica


@pytest.mark.parametrize("ids, kind", [
    ((1, 2, 3, 1, 0, 2), "grouped"),  # rows gathered into the grid and added back
    ((1, 2, 3), "grouped"),  # the grid is the rows in order
    ((3, 1, 2), "grouped"),  # the grid is a permutation of the rows
    ((2, 2, 2), "one"),
    ((1,) * 40 + (0,) * 4 + (3,) * 4, "per_adapter"),
    ((1, 3, 3, 2, 3, 0, 3, 3, 3), "grouped"),  # two decode rows in the grid, a prompt's six with a product of their own
], ids=["mixed decode with a base row", "rows in slot order", "rows permuted", "single adapter", "mixed prefill",
        "decode rows and a prompt"])
def test_weights_cut_to_the_slots_rank_and_refreshed_when_a_slot_is_reactivated(ids, kind):
    """Adapters of rank 2 padded to max_lora_rank 4 (as vLLM stores them): the products run on fp32
    copies cut to rank 2 and give the full computation's result; a slot re-activated with other weights
    (a new generation) is read again, the others are kept."""
    g = torch.Generator().manual_seed(3)
    a = tuple(torch.zeros(4, 1, 4, 16, dtype=torch.bfloat16) for _ in range(2))
    b = tuple(torch.zeros(4, 1, n, 4, dtype=torch.bfloat16) for n in (10, 6))
    for t in a:
        t[:, :, :2] = torch.randn(4, 1, 2, 16, generator=g)
    for t in b:
        t[..., :2] = torch.randn(*t.shape[:3], 2, generator=g)
    x = torch.randn(len(ids), 16, generator=g).to(torch.bfloat16)
    y = torch.randn(len(ids), 16, generator=g).to(torch.bfloat16)

    def want():
        idx = torch.tensor([i - 1 for i in ids])
        out, offset = y.float().clone(), 0
        for ai, bi, n in zip(a, b, (10, 6)):
            out[:, offset: offset + n] += reference(reference(x.float(), ai.float(), idx), bi.float(), idx)
            offset += n
        return out

    for state in [((1, 1, 1), (2, 2, 2), (False,) * 3), ((1, 2, 1), (2, 2, 2), (False,) * 3)]:
        punica = _wrapper_with(ids, state)
        assert punica._rayllm_plan.kind == kind
        plan = punica._rayllm_plan
        assert kind != "grouped" or ((plan.cell_rows is None) == (ids == (1, 2, 3)) and plan.full == (ids in ((3, 1, 2), (1, 3, 3, 2, 3, 0, 3, 3, 3))))
        assert [slot for slot, _ in plan.groups] == ([2] if 0 in ids and len(ids) == 9 else [] if kind != "per_adapter" else [0, 2])
        out = y.clone()
        punica.add_lora_linear(out, x, a, b, 1.0, (10, 6))
        torch.testing.assert_close(out.float(), want(), rtol=2e-2, atol=2e-2)
        assert a[0]._rayllm_fp32[1] == 2 and a[0]._rayllm_fp32[2].shape == (4, 1, 2, 16)
        assert all(torch.equal(out[i], y[i]) for i, lora in enumerate(ids) if lora == 0)  # rows without an adapter
        a[0][1, :, :2] = torch.randn(1, 2, 16, generator=g)  # slot 1 gets another adapter before the next state


def test_the_slices_shrink_weights_are_stacked_and_follow_refreshes_and_rank_changes():
    """A packed layer's slices share one stacked fp32 shrink copy (one product for all slices): a slot
    refreshed in a slice's copy shows in it, and a larger rank rebuilds it."""
    g = torch.Generator().manual_seed(7)
    a = tuple(torch.randn(3, 1, 4, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    first = ((1, 1, 1), (2, 2, 2), (False,) * 3)
    fused = fix._fused_shrink(a, first)
    assert fused.shape == (3, 6, 16)
    torch.testing.assert_close(fused, torch.cat([t[:, 0, :2].float() for t in a], 1))
    assert fix._fused_shrink(a, first) is fused  # kept while nothing changed

    a[1][2] = torch.randn(1, 4, 16, generator=g)
    again = ((1, 1, 2), (2, 2, 2), (False,) * 3)  # slot 2 re-activated
    assert fix._fused_shrink(a, again) is fused  # refreshed in place through the slice's copy
    torch.testing.assert_close(fused, torch.cat([t[:, 0, :2].float() for t in a], 1))

    grown = ((1, 2, 2), (2, 4, 2), (False,) * 3)  # slot 1 now holds a rank-4 adapter
    bigger = fix._fused_shrink(a, grown)
    assert bigger.shape == (3, 12, 16)
    torch.testing.assert_close(bigger, torch.cat([t[:, 0].float() for t in a], 1))


def test_the_products_views_are_made_once_per_slot_state_and_follow_a_rank_change():
    """The views a layer's products read are kept while the slot state stays (grid and a prompt's own
    slot side by side), and made again when it changes: a slot re-activated with a larger rank gives the
    full-rank result at once."""
    g = torch.Generator().manual_seed(8)
    a = tuple(torch.randn(4, 1, 4, 16, generator=g) for _ in range(2))  # every rank non-zero (max_lora_rank 4)
    b = tuple(torch.randn(4, 1, n, 4, generator=g) for n in (10, 6))
    ids = (1, 3, 3, 2, 3, 0, 3, 3, 3)  # a grid of slots 0-1 and slot 2 with a product of its own
    x, y = torch.randn(len(ids), 16, generator=g), torch.randn(len(ids), 16, generator=g)
    idx = torch.tensor([i - 1 for i in ids])

    def want():
        out, offset = y.clone(), 0
        for ai, bi, n in zip(a, b, (10, 6)):
            out[:, offset: offset + n] += reference(reference(x, ai, idx), bi, idx)
            offset += n
        return out

    cut = ((1, 1, 1), (2, 2, 2), (False,) * 3)
    punica = _wrapper_with(ids, cut)  # rank 2 recorded: the products read the first 2 of the 4 ranks
    punica.add_lora_linear(y.clone(), x, a, b, 1.0, (10, 6))
    views = a[0]._rayllm_views
    assert views[0] is cut[0] and set(views[1]) == {(0, 2), 2}
    kept = dict(views[1])
    punica.add_lora_linear(y.clone(), x, a, b, 1.0, (10, 6))
    assert a[0]._rayllm_views is views and all(views[1][k] is v for k, v in kept.items())

    full = ((1, 1, 2), (2, 2, 4), (False,) * 3)  # slot 2 re-activated with a rank-4 adapter
    punica._rayllm_slots = full
    punica.add_lora_linear(out := y.clone(), x, a, b, 1.0, (10, 6))
    assert a[0]._rayllm_views[0] is full[0]
    torch.testing.assert_close(out, want(), rtol=1e-5, atol=1e-5)


def test_activation_refreshes_the_fp32_copies_at_once_including_those_made_inside_a_step():
    """When an adapter is activated into slot 1, every linear layer's copy is brought up to the new slot
    state at once, the ones not made yet made (what the adapter's first request would otherwise do
    itself), including a copy made inside a step (an inference tensor, updatable only in inference
    mode); the logits layer is left alone."""
    from types import SimpleNamespace

    class QKVParallelLinearWithLoRA(SimpleNamespace):  # vLLM's class names: which layers read copies
        pass

    class LogitsProcessorWithLoRA(SimpleNamespace):
        pass

    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 1, 4, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(3, 1, 10, 4, generator=g).to(torch.bfloat16)
    stepped = torch.randn(3, 1, 4, 16, generator=g).to(torch.bfloat16)  # its copy made by a step
    fresh = torch.randn(3, 1, 4, 16, generator=g).to(torch.bfloat16)  # no copy made yet: made now
    logits = torch.zeros(3, 1, 4, 16, dtype=torch.bfloat16)  # never copied
    old = ((1, 1, 1), (4, 4, 4), (False,) * 3)
    fix._fp32(a, 2, old), fix._fp32(b, 3, old)
    with torch.inference_mode():
        fix._fp32(stepped, 2, old)
    assert stepped._rayllm_fp32[2].is_inference()
    manager = SimpleNamespace(modules={
        "q": QKVParallelLinearWithLoRA(lora_a_stacked=(a, stepped, fresh), lora_b_stacked=(b,)),
        "lm_head": LogitsProcessorWithLoRA(lora_a_stacked=logits, lora_b_stacked=None)})
    for t in (a, stepped):
        t[1] = torch.randn(1, 4, 16, generator=g)
    b[1] = torch.randn(1, 10, 4, generator=g)
    new = ((1, 2, 1), (4, 4, 4), (False,) * 3)
    fix._refresh_after_activation(manager, new)
    for weights, rank_first in ((a, a), (b, b.transpose(-1, -2)), (stepped, stepped), (fresh, fresh)):  # expand weights stored rank first
        gens, _, copy = weights._rayllm_fp32
        assert gens is new[0] and torch.equal(copy, rank_first.float())
    assert not hasattr(logits, "_rayllm_fp32")

    for t in (a, fresh):  # another activation, into slot 2: the views kept from the first are reused
        t[2] = torch.randn(1, 4, 16, generator=g)
    b[2] = torch.randn(1, 10, 4, generator=g)
    newer = ((1, 2, 2), (4, 4, 4), (False,) * 3)
    fix._refresh_after_activation(manager, newer)
    for weights, rank_first in ((a, a), (b, b.transpose(-1, -2)), (stepped, stepped), (fresh, fresh)):
        gens, _, copy = weights._rayllm_fp32
        assert gens is newer[0] and torch.equal(copy, rank_first.float())


def test_logits_lora_skipped_when_no_adapter_of_the_batch_has_lm_head_weights():
    ids = (1, 2, 0)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 1, 4, 16, generator=g), torch.randn(4, 1, 30, 4, generator=g)
    x, y = torch.randn(3, 16, generator=g), torch.randn(3, 30, generator=g)
    without = _wrapper_with(ids, ((1, 1), (4, 4), (False, False)))
    out = y.clone()
    without.add_lora_logits(out, x, a, b, 1.0)
    assert torch.equal(out, y)
    with_lm_head = _wrapper_with(ids, ((1, 1), (4, 4), (False, True)))
    out = y.clone()
    with_lm_head.add_lora_logits(out, x, a, b, 1.0)
    idx = with_lm_head.sampler_indices
    torch.testing.assert_close(out, y + reference(reference(x, a, idx), b, idx), rtol=1e-5, atol=1e-5)


def test_without_a_recorded_slot_state_the_fp32_copies_are_not_used():
    """Adapters activated without the wrapped activate_adapter leave no slot state: an fp32 copy could
    then be stale, so add_lora_linear takes vLLM's path (planned shrink/expand) on the live weights."""
    ids = (1, 2, 0)
    g = torch.Generator().manual_seed(6)
    a, b = (torch.randn(4, 1, 4, 16, generator=g),), (torch.randn(4, 1, 10, 4, generator=g),)
    a[0]._rayllm_fp32 = b[0]._rayllm_fp32 = ((), 4, None)  # a copy that must not be read
    punica = _wrapper_with(ids, None)
    del punica._rayllm_slots
    x, y = torch.randn(3, 16, generator=g), torch.randn(3, 10, generator=g)
    out = y.clone()
    punica.add_lora_linear(out, x, a, b, 1.0, (10,))
    idx = punica.token_lora_indices
    torch.testing.assert_close(out, y + reference(reference(x, a[0], idx), b[0], idx), rtol=1e-5, atol=1e-5)
