"""Which floating-point type a run computes in: one rule for training (driver and workers) and serving.

`auto` is bfloat16 where the hardware runs it at speed, float32 elsewhere. CPUs without AVX-512 BF16
or AMX emulate bf16 matmuls about 90× slower than fp32, so a silent bf16 there is never what anyone
wants. torch is imported only inside the functions that ask the hardware: `rayllm.config` and the
CLI import this module's callers without it.
"""

from __future__ import annotations


def cpu_capability() -> str:
    """The SIMD level torch dispatches to on this CPU (e.g. AVX2, AVX512), printed beside dtypes."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def bf16_supported(use_gpu: bool) -> bool:
    """Whether this machine runs bf16 at speed (CPUs without AVX-512 BF16/AMX run it ~90× slower)."""
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(requested: str, use_gpu: bool, bf16_ok: bool | None = None, key: str = "model.dtype") -> str:
    """The dtype name to compute in. `auto` becomes bfloat16 where bf16 runs at speed, else float32;
    explicit names pass through, except bfloat16 on a CPU without bf16 instructions: a ValueError
    naming `key`, never a silent fallback. `bf16_ok` is the hardware's answer when the caller already
    has it (e.g. agreed across workers); None asks this machine."""
    if requested == "auto":
        return "bfloat16" if (bf16_supported(use_gpu) if bf16_ok is None else bf16_ok) else "float32"
    if requested == "bfloat16" and not use_gpu and not (bf16_supported(False) if bf16_ok is None else bf16_ok):
        raise ValueError(f"{key}: bfloat16 requested but this CPU has no bf16 instructions (it would run ~90x slower); "
                         "use dtype: auto or float32")
    return requested
