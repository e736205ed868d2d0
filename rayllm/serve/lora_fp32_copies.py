"""The fp32 copies of vLLM's stacked LoRA weights that the CPU LoRA plugin (`lora_cpu_fix`) computes
on: cut to the adapters' real rank, expand weights stored rank first, a packed layer's shrink weights
stacked into one tensor, and refreshed slot by slot when vLLM activates an adapter into a slot."""

from __future__ import annotations

import threading

import torch

_REFRESH_LOCK = threading.Lock()  # one writer of the fp32 weight copies at a time (see `_fp32`)


def _fp32(weights: torch.Tensor, rank_dim: int, slots) -> torch.Tensor:
    """vLLM's stacked LoRA weights (slots, 1, rank, in) or (slots, 1, out, rank), in fp32 and cut to the
    largest rank held in any slot (vLLM pads every adapter to max_lora_rank), both as (slots, 1, rank, *):
    the expand weights transposed, so that its product reads rows of `out` contiguous values (a decode
    step's 210 expand bmms over 8 slots of SmolLM2-135M, rank 8: 11.4 -> 6.4 ms with the shrinks, one
    torch thread, AVX-512; oneDNN's path for the transposed view is several times slower). Kept on the tensor and
    refreshed slot by slot when an adapter is activated into a slot. Why: a decode step reads every
    slot's weights, so the padding doubles what a rank-8 adapter costs at max_lora_rank 16; and small
    bf16 products are 3-5x slower than fp32 ones on CPU (oneDNN's bf16 path costs ~25 us a call at
    these sizes against ~5 us), converting on every call as much again. The price is memory: the
    slots' weights in fp32 beside vLLM's own (SmolLM2-135M, 8 slots of rank 8 on every projection:
    ~80 MB). `slots`: per adapter slot of the engine, a generation bumped when vLLM activates an adapter
    into it, and that adapter's largest rank (None: unknown); tuples replaced, never mutated, so an
    unchanged state is recognised by identity. The copies are also refreshed as soon as an adapter is
    activated (`_refresh_after_activation`); the lock keeps one writer of a copy at a time."""
    cached = getattr(weights, "_rayllm_fp32", None)
    if cached is not None and cached[0] is slots[0]:
        return cached[2]
    with _REFRESH_LOCK:
        return _refreshed(weights, rank_dim, slots)


def _fused_shrink(a_slices, slots) -> torch.Tensor:
    """The shrink weights of a layer's slices (vLLM's packed q/k/v or gate/up projections) as one fp32
    (slots, slices x rank, in) tensor: one product per call instead of one per slice (a decode step of
    SmolLM2-135M: 120 shrink products instead of 210). Each slice's fp32 copy (`_fp32`) is made a view
    into it, so that refreshing a slot of a slice's copy refreshes the stacked one too; rebuilt when a
    slice's copy was replaced (a new rank)."""
    copies = [_fp32(a, 2, slots)[:, 0] for a in a_slices]
    if len(copies) == 1:
        return copies[0]
    first = a_slices[0]
    cached = getattr(first, "_rayllm_fused", None)
    if cached is not None and all(c.data_ptr() == v.data_ptr() for c, v in zip(copies, cached[1])):
        return cached[0]
    with _REFRESH_LOCK:
        copies = [_refreshed(a, 2, slots)[:, 0] for a in a_slices]
        fused = torch.cat(copies, 1)
        rank, views = copies[0].shape[1], []
        for i, a in enumerate(a_slices):
            view = fused[:, i * rank: (i + 1) * rank].unsqueeze(1)  # (slots, 1, rank, in), as `_fp32` keeps it
            gens, kept_rank, _ = a._rayllm_fp32
            a._rayllm_fp32 = (gens, kept_rank, view)
            views.append(view[:, 0])
        first._rayllm_fused = (fused, views)
    return fused


def _refreshed(weights: torch.Tensor, rank_dim: int, slots, changed: dict | None = None) -> torch.Tensor:
    """`_fp32`'s work, under `_REFRESH_LOCK`: the copy made current for `slots`. `changed`: a memo of
    `_changed_slots` shared by the calls of one refresh (most copies were last refreshed together)."""
    gens, slot_ranks = slots[:2]
    cached = getattr(weights, "_rayllm_fp32", None)
    if cached is not None and cached[0] is gens:  # refreshed while this caller waited for the lock
        return cached[2]
    ranks = list(slot_ranks[: weights.shape[0]])
    rank = max(ranks) if ranks and None not in ranks else weights.shape[rank_dim]
    rank = min(rank, weights.shape[rank_dim])
    if cached is None or cached[1] != rank:
        copy = _rank_first(weights.narrow(rank_dim, 0, rank), rank_dim).float().contiguous()
    else:
        copy, seen = cached[2], cached[0]
        key = (seen, weights.shape[0])
        todo = changed.get(key) if changed is not None else None
        if todo is None:
            todo = _changed_slots(seen, gens, weights.shape[0])
            if changed is not None:
                changed[key] = todo
        if todo:
            pairs = _slot_pairs(weights, rank_dim, rank, copy)
            for slot in todo:
                pairs[slot][0].copy_(pairs[slot][1])
    weights._rayllm_fp32 = (gens, rank, copy)
    return copy


def _changed_slots(seen: tuple, gens: tuple, n: int) -> list:
    """The slots among the first `n` whose generation moved since `seen`."""
    return [slot for slot, gen in enumerate(gens[:n]) if slot >= len(seen) or seen[slot] != gen]


def _slot_pairs(weights: torch.Tensor, rank_dim: int, rank: int, copy: torch.Tensor) -> list:
    """Per slot, (its part of the fp32 `copy`, its part of vLLM's `weights` as the copy lays it out): the
    views a refresh copies between, made once per copy (a refresh of one slot copies ~420 small tensors
    for SmolLM2-135M, and making their views again each time cost as much as the copies)."""
    cached = getattr(weights, "_rayllm_pairs", None)
    if cached is not None and cached[0] is copy:
        return cached[1]
    pairs = [(copy[slot], _rank_first(weights[slot].narrow(rank_dim - 1, 0, rank), rank_dim - 1))
             for slot in range(weights.shape[0])]
    weights._rayllm_pairs = (copy, pairs)
    return pairs


def _rank_first(weights: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """The (..., out, rank) expand weights as a (..., rank, out) view; the shrink ones, already rank
    first, as they are."""
    return weights.transpose(-1, -2) if rank_dim == weights.dim() - 1 else weights


def _refresh_after_activation(manager, slots) -> None:
    """Bring the engine's fp32 copies (`_fp32`) of the linear layers (vLLM's `*LinearWithLoRA` classes,
    the only ones whose LoRA reads them) up to `slots` as soon as vLLM activates an adapter (at its
    add_lora, or when a request swaps it in), making the copies not made yet (the first activation
    is vLLM's start-up or the first load), so that no request converts slots in its own step. Done at
    once, in the engine's thread: a background thread for it (tried, 2026-12-03) held the GIL while
    the engine answered the load and took the first request's step, and on a 2-core fp32 machine the
    hot load came out 98 ms above a warm request with it against 71 ms done at once (medians of 5
    loads each, one sitting; SmolLM2-135M, rank 8 on every projection). In inference mode: copies made
    inside a step are inference tensors, which may only be updated in that mode."""
    changed: dict = {}
    with _REFRESH_LOCK, torch.inference_mode():
        for weights, rank_dim in _linear_stacks(manager):
            _refreshed(weights, rank_dim, slots, changed)


def _linear_stacks(manager) -> list:
    """(stacked weights, rank dim) of every linear LoRA layer of the engine; listed once per set of
    modules (the engine's layers do not change after start-up)."""
    modules = getattr(manager, "modules", {})
    cached = getattr(manager, "_rayllm_stacks", None)
    if cached is not None and cached[0] == len(modules):
        return cached[1]
    stacks = []
    for module in modules.values():
        if "Linear" not in type(module).__name__:
            continue
        for name, rank_dim in (("lora_a_stacked", 2), ("lora_b_stacked", 3)):
            stacked = getattr(module, name, None)
            for weights in (stacked,) if isinstance(stacked, torch.Tensor) else (stacked or ()):
                if isinstance(weights, torch.Tensor):
                    stacks.append((weights, rank_dim))
    manager._rayllm_stacks = (len(modules), stacks)
    return stacks
