"""The engine side of serving: lease the request's adapter, run it on the engine, shape the output.

`LLMServerCore` is what the Ray Serve LLM deployment wraps (app.py) and what unit tests drive
directly with a FakeEngine (`LocalBackend`). Its output follows `protocol.Backend.generate`.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from rayllm.serve.errors import ServeError
from rayllm.serve.protocol import AdapterSpec, Engine, Kind
from rayllm.serve.residency import AdapterManager


class LLMServerCore:
    def __init__(self, engine: Engine, adapters: AdapterManager):
        self.engine = engine
        self.adapters = adapters

    async def generate(self, kind: Kind, request: Any, spec: AdapterSpec | None) -> AsyncIterator[Any]:
        lease = None
        try:
            if spec is not None:
                lease = await self.adapters.acquire(spec)
            # The engine finds the adapter by this name; a newer generation may have replaced the spec's.
            request.model = lease.name if lease else self.engine.model_name
            wants_usage = bool(request.stream and request.stream_options and request.stream_options.include_usage)
            if request.stream:
                _force_usage(request)
            call = self.engine.completion if kind == "completion" else self.engine.chat
            result = await call(request)
        except ServeError as e:
            if lease:
                lease.release()
            yield {"status": e.status, "body": e.body()}
            return
        except BaseException:
            if lease:
                lease.release()
            raise
        try:
            if not request.stream:
                body = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
                yield {"status": 200, "body": body}
                return
            yield {"status": 200, "stream": True}
            usage = None
            async for chunk in result:
                if usage is None and '"choices":[]' in chunk and '"usage":{' in chunk:
                    usage = _usage_of(chunk)
                    if not wants_usage:
                        continue
                yield chunk
            yield {"usage": usage or {}}
        finally:
            if lease:
                lease.release()


def _force_usage(request: Any) -> None:
    """Streams always end with a usage chunk (for per-adapter token metrics); it is dropped again
    unless the client asked for it."""
    from vllm.entrypoints.generate.base.protocol import StreamOptions

    opts = request.stream_options
    request.stream_options = StreamOptions(
        include_usage=True, continuous_usage_stats=bool(opts and opts.continuous_usage_stats)
    )


def _usage_of(chunk: str) -> dict | None:
    try:
        return json.loads(chunk.removeprefix("data: ")).get("usage")
    except ValueError:
        return None


class LocalBackend:
    """A Backend that calls an LLMServerCore in the same process (unit tests, single-process tools)."""

    def __init__(self, core: LLMServerCore):
        self.core = core

    def generate(self, kind: Kind, request: Any, spec: AdapterSpec | None) -> AsyncIterator[Any]:
        return self.core.generate(kind, request, spec)

    async def load(self, spec: AdapterSpec) -> None:
        await self.core.adapters.load(spec)

    async def unload(self, name: str) -> None:
        await self.core.adapters.unload(name)

    async def check_health(self) -> None:
        await self.core.engine.check_health()
