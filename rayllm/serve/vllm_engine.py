"""The vLLM implementation of `protocol.Engine`: AsyncLLM plus vLLM's own OpenAI serving objects.

Completions and chat go through vLLM's `OpenAIServingCompletion` / `OpenAIServingChat`, so
echo, logprobs, prompt logprobs, stop, n, seed and streaming behave exactly as in
`vllm serve`; rayllm decides which adapter a request gets (residency.py) and registers it in
vLLM's `lora_requests` table under the name responses should show.

Chat prompts are rendered by vLLM with the tokenizer's chat template, which is the template
`rayllm.chat.render_chat` uses for SFT data (a tokenizer without one gets rayllm's default here
too); tests/ray/test_serve_stack.py checks the two give the same token ids.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rayllm.config.serve import ServeConfig
from rayllm.serve.errors import ServeError, from_vllm_error, from_vllm_exception

logger = logging.getLogger(__name__)


def resolve_dtype(requested: str, on_gpu: bool, bf16_ok: bool | None = None) -> str:
    """The engine dtype. On a GPU the configured value goes to vLLM as is (`auto` is then vLLM's own
    choice); on a CPU rayllm's rule (rayllm.dtypes): `auto` is bf16 only where the CPU has it, and
    bf16 on a CPU without it is an error, not a silent fallback. `bf16_ok` None asks this CPU."""
    from rayllm.dtypes import resolve_dtype as rayllm_dtype

    return requested if on_gpu else rayllm_dtype(requested, use_gpu=False, bf16_ok=bf16_ok, key="serve.dtype")


def engine_cli_args(cfg: ServeConfig, dtype: str, on_gpu: bool, chat_template: str | None) -> list[str]:
    """The `vllm serve` arguments this config means (parsed by vLLM's own parser, so vLLM validates them)."""
    args = [
        "--model", cfg.model,
        "--served-model-name", cfg.served_model_name,
        "--dtype", dtype,
        "--max-model-len", str(cfg.max_model_len),
        "--enable-lora",
        "--max-loras", str(cfg.max_loras),
        "--max-lora-rank", str(cfg.max_lora_rank),
        "--max-cpu-loras", str(cfg.max_cpu_loras),
        "--seed", str(cfg.seed),
        "--disable-log-stats",
    ]
    if cfg.max_num_seqs is not None:
        args += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.enforce_eager:
        args.append("--enforce-eager")
    if on_gpu:
        args += ["--kv-cache-memory-bytes", str(cfg.kv_cache_gib << 30)]
    else:
        args += ["--distributed-executor-backend", cfg.cpu_executor]
    if chat_template is not None:
        args += ["--chat-template", chat_template]
    return args


def cpu_engine_env(cfg: ServeConfig, dtype: str) -> dict[str, str]:
    """Environment of a CPU engine computing in `dtype`, set in the replica before vLLM starts its
    engine-core process.

    vLLM's default CPU executor runs the model in a worker process and keeps its engine core
    polling that worker on a core of its own (vLLM's "TODO: make scheduler proc sleep when idle");
    on a 2-core machine that core is half the machine. With `uni` the model runs inside the engine
    core, whose loop blocks while idle; vLLM accepts `uni` on CPU only with
    VLLM_ENABLE_V1_MULTIPROCESSING=0, which the async engine a replica runs does not otherwise read.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib)}
    if cfg.cpu_executor == "uni":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        budget = max(1, int(cfg.replica_cpus)) if cfg.max_llm_replicas > 1 else None
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads or default_cpu_threads(dtype, budget))
    return env


def default_cpu_threads(dtype: str, budget: int | None = None) -> int:
    """The engine's compute threads when serve.cpu_threads is empty, from the cores this process may
    run on, at most `budget` of them: where several LLM replicas may run, each replica's own Ray
    CPUs (Ray places replicas by them but does not pin their threads; with every engine taking
    every core, N replicas on a node would run N times the node's threads). Measured on 2 cores,
    SmolLM2-135M, 8 streams (benchmarks/README.md): in bf16 on an AMX CPU one thread, the other
    core left to the serving layer, matched plain vLLM (two threads: TTFT p50 150 -> 210 ms, the OpenMP threads competing with the serving layer); in fp32 on an
    AVX-512 CPU without BF16, where a decode step takes 4x longer, one thread gave 0.71x plain
    vLLM's tokens/s and two threads 1.14x and 1.18x in two runs (TTFT p50 -15 % and -9 %, p99
    about twice vLLM's)."""
    cores = len(os.sched_getaffinity(0))
    if budget is not None:
        cores = min(cores, budget)
    return max(1, cores - 1) if dtype == "bfloat16" else cores


def _tokenizer_has_chat_template(model_dir: str) -> bool:
    from transformers import AutoTokenizer

    try:
        return bool(AutoTokenizer.from_pretrained(model_dir).chat_template)
    except Exception:  # noqa: BLE001 - vLLM reports an unusable tokenizer itself, with a better message
        return True


class VLLMEngine:
    """AsyncLLM + vLLM's OpenAI serving objects for one base model with LoRA adapters."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.model_name = cfg.served_model_name
        self.max_model_len = cfg.max_model_len
        self.dtype: str | None = None
        self._engine: Any = None
        self._state: Any = None

    async def start(self) -> None:
        import torch
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        on_gpu = torch.cuda.is_available()
        self.dtype = resolve_dtype(self.cfg.dtype, on_gpu)
        if not on_gpu:
            os.environ.update(cpu_engine_env(self.cfg, self.dtype))
        template = None
        if not _tokenizer_has_chat_template(self.cfg.model):
            from rayllm.chat import DEFAULT_CHAT_TEMPLATE

            template = DEFAULT_CHAT_TEMPLATE
        logger.info("rayllm: starting vLLM on %s, dtype %s (CPU capability %s)", "GPU" if on_gpu else "CPU",
                    self.dtype, torch.backends.cpu.get_cpu_capability())
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(self.cfg, self.dtype, on_gpu, template))
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config()
        self._engine = AsyncLLM.from_vllm_config(vllm_config, enable_log_requests=False, disable_log_stats=True)
        self._state = State()
        await init_app_state(self._engine, self._state, args, await self._engine.get_supported_tasks())
        await self._warm_up()

    async def _warm_up(self) -> None:
        """Generate one token, so a model this vLLM cannot run (e.g. a head size its CPU attention
        lacks) fails the replica's start with the reason, instead of every request with a 500."""
        from vllm import SamplingParams

        try:
            async for _ in self._engine.generate({"prompt_token_ids": [0]}, SamplingParams(max_tokens=1), request_id="rayllm-warm-up"):
                pass
        except Exception as e:  # noqa: BLE001 - re-raised with the model named
            self._engine.shutdown()
            raise RuntimeError(f"vLLM started but cannot generate with {self.cfg.model}: {e} (the engine's own error is in "
                               f"this replica's log, e.g. a head size vLLM's CPU attention does not support)") from None

    async def completion(self, request: Any) -> Any:
        return await self._run(self._state.openai_serving_completion, "create_completion", request)

    async def chat(self, request: Any) -> Any:
        return await self._run(self._state.openai_serving_chat, "create_chat_completion", request)

    async def _run(self, serving: Any, method: str, request: Any) -> Any:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        try:
            result = await getattr(serving, method)(request, None)
        except (VLLMClientError, ValueError, TypeError, OverflowError) as e:
            # vLLM raises some request errors (context length, bad sampling params) instead of returning them
            raise from_vllm_exception(e) from None
        if isinstance(result, ErrorResponse):
            raise from_vllm_error(result)
        return result

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)
        try:
            await self._engine.add_lora(request)
        except Exception as e:  # noqa: BLE001 - the engine reports a bad adapter; the server stays up
            raise ServeError(400, f"adapter '{name}' failed to load in vLLM: {e}", "model") from None
        self._state.openai_serving_models.lora_requests[name] = request

    async def remove_lora(self, name: str, lora_id: int) -> None:
        table = self._state.openai_serving_models.lora_requests
        if name in table and table[name].lora_int_id == lora_id:
            del table[name]
        await self._engine.remove_lora(lora_id)

    async def check_health(self) -> None:
        try:
            await self._engine.check_health()
        except Exception as e:  # noqa: BLE001
            raise ServeError(503, f"engine unhealthy: {e}") from None

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
