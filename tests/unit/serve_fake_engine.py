"""FakeEngine: a stand-in for VLLMEngine in fast unit tests of routing, errors, auth and residency.

It answers with the adapter's *weights tag* (the text of `weights.txt` in the adapter folder, or
"base"), so a test can tell exactly which weights served each request. Requests and responses
are vLLM's own protocol types and sampling parameters go through vLLM's own validation; the real
engine path is tested in tests/ray/test_serve_stack.py.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from rayllm.serve.errors import ServeError, from_vllm_exception


def make_adapter_dir(path: Path, tag: str, rank: int = 8, fingerprint: str | None = "sha256:fake-base") -> Path:
    """A folder FakeEngine (and compat.check_adapter) accepts: PEFT config, rayllm metadata, weights tag."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj", "v_proj"]}))
    meta = {"rank": rank, "target_modules": ["q_proj", "v_proj"]}
    if fingerprint is not None:
        meta["base_fingerprint"] = fingerprint
    (path / "rayllm_adapter.json").write_text(json.dumps(meta))
    (path / "weights.txt").write_text(tag)
    return path


class FakeEngine:
    def __init__(self, model_name: str = "base", max_model_len: int = 64, chunk_delay: float = 0.0, load_delay: float = 0.0):
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.chunk_delay = chunk_delay
        self.load_delay = load_delay
        self.loras: dict[str, tuple[int, str]] = {}
        self.events: list[tuple[str, str, int]] = []  # ("add"|"remove", name, lora_id)
        self.in_flight: Counter = Counter()  # lora name -> requests running now
        self.healthy = True

    async def start(self) -> None:
        pass

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        await asyncio.sleep(self.load_delay)
        if not (Path(path) / "weights.txt").is_file():
            raise ServeError(400, f"adapter '{name}' failed to load in FakeEngine: no weights in {path}", "model")
        self.loras[name] = (lora_id, path)
        self.events.append(("add", name, lora_id))

    async def remove_lora(self, name: str, lora_id: int) -> None:
        if name in self.loras and self.loras[name][0] == lora_id:
            del self.loras[name]
        self.events.append(("remove", name, lora_id))

    async def check_health(self) -> None:
        if not self.healthy:
            raise ServeError(503, "engine unhealthy: FakeEngine marked unhealthy")

    async def shutdown(self) -> None:
        pass

    def _tag(self, model: str) -> str:
        if model == self.model_name:
            return "base"
        if model not in self.loras:
            raise ServeError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")
        return (Path(self.loras[model][1]) / "weights.txt").read_text()

    def _prepare(self, request, prompt_len: int, max_tokens: int) -> str:
        tag = self._tag(request.model)
        if prompt_len + max_tokens > self.max_model_len:
            raise ServeError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                  f"the prompt has {prompt_len} and max_tokens is {max_tokens}", "input_tokens")
        try:
            request.to_sampling_params(max_tokens, {})  # vLLM's own range checks (temperature, n, ...)
        except Exception as e:  # noqa: BLE001
            raise from_vllm_exception(e) from None
        return tag

    async def completion(self, request):
        from vllm.entrypoints.openai.completion.protocol import (CompletionResponse, CompletionResponseChoice,
                                                                 CompletionResponseStreamChoice, CompletionStreamResponse)
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        prompt = request.prompt
        prompt_len = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        max_tokens = request.max_tokens if request.max_tokens is not None else 16
        tag = self._prepare(request, prompt_len, max_tokens)
        words = [f"{tag}:{i}" for i in range(max_tokens)]
        usage = UsageInfo(prompt_tokens=prompt_len, completion_tokens=max_tokens, total_tokens=prompt_len + max_tokens)
        if not request.stream:
            self.in_flight[request.model] += 1
            try:
                await asyncio.sleep(self.chunk_delay * max_tokens)
            finally:
                self.in_flight[request.model] -= 1
            choice = CompletionResponseChoice(index=0, text=" ".join(words), finish_reason="length")
            return CompletionResponse(model=request.model, choices=[choice], usage=usage)

        async def chunks():
            self.in_flight[request.model] += 1
            try:
                for w in words:
                    await asyncio.sleep(self.chunk_delay)
                    c = CompletionResponseStreamChoice(index=0, text=w + " ")
                    yield f"data: {CompletionStreamResponse(model=request.model, choices=[c]).model_dump_json()}\n\n"
                if request.stream_options and request.stream_options.include_usage:
                    yield f"data: {CompletionStreamResponse(model=request.model, choices=[], usage=usage).model_dump_json()}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight[request.model] -= 1

        return chunks()

    async def chat(self, request):
        from vllm.entrypoints.openai.chat_completion.protocol import (ChatCompletionResponse, ChatCompletionResponseChoice,
                                                                      ChatCompletionResponseStreamChoice,
                                                                      ChatCompletionStreamResponse, ChatMessage)
        from vllm.entrypoints.generate.base.protocol import DeltaMessage
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        prompt_len = sum(len(str(m.get("content", "")).split()) for m in request.messages)
        max_tokens = request.max_completion_tokens or request.max_tokens or 16
        tag = self._prepare(request, prompt_len, max_tokens)
        text = " ".join(f"{tag}:{i}" for i in range(max_tokens))
        usage = UsageInfo(prompt_tokens=prompt_len, completion_tokens=max_tokens, total_tokens=prompt_len + max_tokens)
        if not request.stream:
            choice = ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content=text), finish_reason="length")
            return ChatCompletionResponse(model=request.model, choices=[choice], usage=usage)

        async def chunks():
            first = ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))
            yield f"data: {ChatCompletionStreamResponse(model=request.model, choices=[first]).model_dump_json()}\n\n"
            for w in text.split():
                await asyncio.sleep(self.chunk_delay)
                c = ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content=w + " "))
                yield f"data: {ChatCompletionStreamResponse(model=request.model, choices=[c]).model_dump_json()}\n\n"
            if request.stream_options and request.stream_options.include_usage:
                yield f"data: {ChatCompletionStreamResponse(model=request.model, choices=[], usage=usage).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return chunks()


def make_frontend(tmp_path: Path, engine: FakeEngine | None = None, keys=None, folders: dict[str, str] | None = None,
                  registry_root: str | None = None, slots: int = 4, seed: int = 0, limits=None, max_model_len: int | None = None,
                  lora_roots: tuple[str, ...] | None = None):
    """The real HTTP layer, catalog, residency and metrics over a FakeEngine, in this process."""
    import random

    from rayllm.config.serve import ServeLimits
    from rayllm.serve.adapters import AdapterCatalog
    from rayllm.serve.auth import Keys
    from rayllm.serve.metrics import ServeMetrics
    from rayllm.serve.openai_routes import Frontend
    from rayllm.serve.residency import AdapterManager
    from rayllm.serve.server import LLMServerCore, LocalBackend

    engine = engine or FakeEngine()
    adapters = AdapterManager(engine, slots=slots, max_rank=16, base_fingerprint="sha256:fake-base",
                              stage_dir=str(tmp_path / "stage"))
    limits = limits or ServeLimits()
    catalog = AdapterCatalog("base", folders, registry_root, refresh_s=0.0, rng=random.Random(seed),
                             cache_size=limits.model_cache_size, names_ttl_s=limits.unknown_model_cache_s)
    return Frontend(catalog, LocalBackend(LLMServerCore(engine, adapters)), keys or Keys(), ServeMetrics(),
                    limits=limits, max_model_len=max_model_len,
                    lora_roots=(str(tmp_path),) if lora_roots is None else tuple(lora_roots))


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body, and "[DONE]" for the terminator."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
