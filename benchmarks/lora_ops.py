"""CPU LoRA ops of one decode step: rayllm's fused and grouped ops against vLLM's and rayllm's previous ones.

    .venv/bin/python benchmarks/lora_ops.py          # a few seconds, no engine started

SmolLM2-135M shapes (30 layers; qkv, o, gate_up, down projections), 8 adapter slots of rank 16
(vLLM's max_lora_rank in serve_throughput), bf16 weights and activations as served on an AVX-512
CPU, fp32 shrink buffer as vLLM allocates it; decode-shaped batches of 8 and 16 rows with no adapter,
one adapter, and 8 adapters round-robin. `vllm`: vLLM's bgmv ops (one weight matrix gathered per
token; wrong for rows without an adapter, timed anyway); `previous`: rayllm's fixed bgmv ops (the
same gather for decode); `grouped`: the per-step plan through the shrink/expand ops (one bmm over
the stacked weights); `fused`: what vLLM's `add_lora_linear` now runs (`_Plan.add_linear`: fp32
copies cut to the adapters' rank 8, one gather and one write per projection). Prints ms per step
and previous/fused, then the read floor: how long one pass over 8 slots' fp32 LoRA weights takes
against one over the base model's (the least a mixed step can cost above a weight-bound base-only
one). Torch runs 1 thread (the engine's default for bf16 on 2 cores; fp32 engines run 2).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quiet import cpu_capability, note, window  # noqa: E402

from rayllm.dtypes import bf16_supported  # noqa: E402
from rayllm.serve import lora_cpu_fix as fix  # noqa: E402

LAYERS, SLOTS, RANK, HIDDEN = 30, 8, 16, 576
ADAPTER_RANK = 8  # the adapters' rank, padded to RANK by vLLM
SLOT_STATE = ((1,) * SLOTS, (ADAPTER_RANK,) * SLOTS)  # (generation, rank) of each slot, as the engine records them
PROJECTIONS = [(HIDDEN, (576, 192, 192)), (HIDDEN, (576,)), (HIDDEN, (1536, 1536)), (1536, (HIDDEN,))]


def layer_weights(dtype):
    g = torch.Generator().manual_seed(0)
    return [([torch.randn(SLOTS, 1, RANK, d_in, generator=g).to(dtype) for _ in outs],
             [torch.randn(SLOTS, 1, d_out, RANK, generator=g).to(dtype) for d_out in outs], d_in, outs)
            for d_in, outs in PROJECTIONS]


def step(kind: str, weights, indices: torch.Tensor, dtype) -> None:
    """One decode step's LoRA work: per projection, shrink each slice into an fp32 buffer, expand into y."""
    rows = indices.shape[0]
    punica = SimpleNamespace(token_lora_indices=indices, _rayllm_plan=fix._Plan(indices))
    for a_slices, b_slices, d_in, outs in weights:
        x, y = torch.ones(rows, d_in, dtype=dtype), torch.zeros(rows, sum(outs), dtype=dtype)
        if kind == "fused":
            if punica._rayllm_plan.kind != "none":
                punica._rayllm_plan.add_linear(y, x, a_slices, b_slices, 1.0, outs, SLOT_STATE)
            continue
        offset = 0
        for a, b, d_out in zip(a_slices, b_slices, outs):
            buf = torch.zeros(rows, RANK)
            if kind == "grouped":
                fix._shrink(punica, buf, x, a, 1.0)
                fix._expand_slice(punica, y, buf, b, offset, d_out, True)
            else:
                ops = fix.ORIGINALS if kind == "vllm" else vars(fix)
                ops["bgmv_shrink"](x, a, buf, indices, 1.0)
                ops["bgmv_expand_slice"](buf, b, y, indices, offset, d_out, True)
            offset += d_out


def timed(kind: str, weights, indices, dtype, repeat: int) -> float:
    for _ in range(2):
        step(kind, weights, indices, dtype)
    t = time.perf_counter()
    for _ in range(repeat):
        for _ in range(LAYERS):  # the layers share weights: their shapes, not their values, set the cost
            step(kind, weights, indices, dtype)
    return 1000 * (time.perf_counter() - t) / repeat


def main() -> None:
    import vllm.lora.ops.torch_ops.lora_ops as ops

    torch.set_num_threads(1)
    fix.ORIGINALS.update({n: getattr(ops, n) for n in fix._PATCHED_NAMES if getattr(ops, n) is not getattr(fix, n)})
    dtype = torch.bfloat16 if bf16_supported(False) else torch.float32
    cap = cpu_capability()
    weights = layer_weights(dtype)
    print(f"# lora_ops: SmolLM2-135M shapes, {LAYERS} layers, {SLOTS} slots of rank {RANK}, {dtype}, CPU capability {cap}")
    print("| rows | traffic | vllm ms/step | previous ms/step | grouped ms/step | fused ms/step | previous/fused | machine |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in (8, 16):
        cases = [("no adapter", torch.full((rows,), -1)), ("one adapter", torch.full((rows,), 3)),
                 ("8 adapters", torch.arange(rows) % SLOTS)]
        if rows == 8:  # a step that a new request's 10-token prompt joins: 7 decode rows and 10 prompt rows
            cases.append(("8 adapters, a prompt joins", torch.tensor(list(range(7)) + [7] * 10)))
        for traffic, indices in cases:
            with window(10.0) as w:
                ms = {kind: timed(kind, weights, indices, dtype, 3) for kind in ("vllm", "previous", "grouped", "fused")}
            f = w.figure(ms["fused"])
            print(f"| {indices.shape[0]} | {traffic} | {ms['vllm']:.1f} | {ms['previous']:.1f} | {ms['grouped']:.1f} | {ms['fused']:.1f} | "
                  f"**{ms['previous'] / ms['fused']:.1f}x** | {note(f, cap)} |", flush=True)

    read_floor(cap)


def read_floor(cap: str) -> None:
    """What no LoRA kernel can go under in fp32: a decode step with 8 adapters present reads the 8
    slots' weights (rank 8 on every projection, each of the 30 layers its own) once, and a base-only
    step reads the base model's. Timed as one pass over fp32 tensors of those sizes (a sum, which
    streams them from memory), one thread."""
    per_slot = sum(ADAPTER_RANK * (d_in * len(outs) + sum(outs)) for d_in, outs in PROJECTIONS)
    lora = [torch.ones(SLOTS * per_slot) for _ in range(LAYERS)]
    vocab, embed = 49152, HIDDEN * 49152  # tied embeddings: the logits read them too
    per_layer = sum(d_in * sum(outs) for d_in, outs in PROJECTIONS)
    base = [torch.ones(per_layer) for _ in range(LAYERS)] + [torch.ones(embed)]

    def read(tensors) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for v in tensors:
                v.sum()
            best = min(best, time.perf_counter() - t)
        return 1000 * best

    with window(5.0) as w:
        lora_ms, base_ms = read(lora), read(base)
    mb = 4 * SLOTS * per_slot * LAYERS / 1e6, 4 * (per_layer * LAYERS + embed) / 1e6
    print(f"\nread floor, fp32, one thread: 8 slots' LoRA weights ({mb[0]:.0f} MB) {lora_ms:.1f} ms, the base model's "
          f"({mb[1]:.0f} MB, {vocab}-token vocabulary) {base_ms:.1f} ms: a mixed step is at least {lora_ms / base_ms:.0%} of "
          f"a weight-bound base-only step longer; {note(w.figure(lora_ms), cap)}")


if __name__ == "__main__":
    main()
