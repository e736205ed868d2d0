"""One way to start an offline vLLM engine (`vllm.LLM`) inside a Ray actor, for every actor that
generates: the eval's Ray Data pool (rayllm/eval/generate.py) and GRPO's rollout actors
(rayllm/train/rollout.py). Serving uses vLLM's async engine instead (rayllm/serve/vllm_engine.py)."""

from __future__ import annotations

import os
from typing import Any


def offline_llm(model_dir: str, *, dtype: str, dtype_key: str, kv_cache_gib: int, max_model_len: int,
                enforce_eager: bool, in_process: bool = True, seed: int = 0, **engine: Any):
    """A `vllm.LLM` for `model_dir`. `dtype` follows rayllm's one rule (`auto`: bf16 only where the CPU
    runs it fast; bf16 asked of a CPU without it is an error naming `dtype_key`); on CPU the KV cache
    gets `kv_cache_gib` GiB (without it vLLM-CPU reserves a share of all memory and may refuse to start
    on a busy node). `engine`: further `LLM` arguments (LoRA settings)."""
    import torch

    from rayllm.dtypes import resolve_dtype

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if in_process:
        # The engine core and its worker in this process: no two more processes to spawn, each importing
        # vLLM again (about 20 s of a 35 s start for a tiny model on 2 cores).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine["distributed_executor_backend"] = "uni"
    from vllm import LLM

    resolved = dtype if on_gpu else resolve_dtype(dtype, use_gpu=False, key=dtype_key)
    return LLM(model=model_dir, dtype=resolved, max_model_len=max_model_len, enforce_eager=enforce_eager,
               seed=seed, disable_log_stats=True, **engine)


def load_weights(llm, weights: dict[str, Any]) -> None:
    """Put a full fine-tune's new weights (Hugging Face names, CPU tensors) into the running engine, as
    TRL's colocate mode and OpenRLHF do. Through the worker's `reload_weights`, not the model's
    `load_weights`: vLLM-CPU repacks linear weights after loading (their parameters lose the loader
    that maps HF names onto the fused q/k/v, gate/up layers), and the reload restores that layout,
    loads and repacks again. Cached prefixes were computed with the old weights: dropped."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True})
    llm.reset_prefix_cache()


def weight_checksum(llm, name: str) -> float:
    """The sum of the engine's parameter `name` (a vLLM name), in float64: compares engine and trainer."""
    return llm.apply_model(lambda model: float(dict(model.named_parameters())[name].double().sum()))[0]
