"""The HTTP layer: OpenAI-compatible routes over a `Backend`, with vLLM's own protocol types.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with SSE), GET /v1/models,
GET /health, GET /metrics, GET /playground when `serve.playground` is on (a static page that calls
the /v1 routes like any client), and — only when an admin key is configured — vLLM's
POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter.

Bodies are parsed here, not by FastAPI, so every mistake (bad JSON, wrong type, unknown model,
prompt too long, incompatible adapter) comes back as OpenAI-style error JSON with a 4xx. What one
request may cost is bounded by `serve.limits`: body size (413, refused before it is read whole),
JSON depth, `n`, `best_of`, logprobs and `max_tokens` (400 naming the field and the cap), and the
time to its last byte (504).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from rayllm.registry.names import AdapterRef, InvalidNameError
from rayllm.serve.adapters import AdapterCatalog
from rayllm.serve.auth import Keys, require_admin_key, require_api_key, require_own_adapter
from rayllm.config.serve import ServeLimits
from rayllm.serve.errors import ServeError, from_exception, from_validation_error, sse_error
from rayllm.serve.folders import check_lora_path
from rayllm.serve.metrics import UNRESOLVED, ServeMetrics, split_served_name
from rayllm.serve.protocol import Backend, Kind

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


@dataclass
class Frontend:
    """Everything the routes need; built once per ingress replica."""

    catalog: AdapterCatalog
    backend: Backend
    keys: Keys
    metrics: ServeMetrics
    playground: bool = False
    limits: ServeLimits = field(default_factory=ServeLimits)
    max_model_len: int | None = None  # the max_tokens cap when limits.max_tokens is empty
    lora_roots: tuple[str, ...] = ()  # where the load route may load from (serve.lora_roots)

    @property
    def max_tokens_cap(self) -> int | None:
        return self.limits.max_tokens or self.max_model_len


def _request_types() -> dict[Kind, type]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"completion": CompletionRequest, "chat": ChatCompletionRequest}


def _too_large(limit: int) -> ServeError:
    return ServeError(413, f"request body is larger than {limit} bytes (serve.limits.max_body_bytes)")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` (by Content-Length, or while it streams in)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ServeError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _deeper_than(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:  # iterative: the depth being checked is the attacker's to choose
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


async def _json_body(request: Request, limits: ServeLimits) -> dict[str, Any]:
    raw = await _read_body(request, limits.max_body_bytes)
    try:
        data = json.loads(raw)
    except RecursionError:
        data = None  # nested beyond what the parser recurses into: certainly beyond the limit
    except ValueError as e:
        raise ServeError(400, f"request body is not valid JSON: {e}") from None
    if data is None and raw.strip() != b"null" or _deeper_than(data, limits.max_json_depth):
        raise ServeError(400, f"request body is nested deeper than {limits.max_json_depth} levels (serve.limits.max_json_depth)")
    if not isinstance(data, dict):
        raise ServeError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _over(param: str, value: Any, cap: int | None, key: str) -> None:
    if cap is not None and isinstance(value, int) and not isinstance(value, bool) and value > cap:
        raise ServeError(400, f"{param} is {value}; this server allows at most {cap} (serve.limits.{key})", param)


def _check_caps(front: Frontend, req: Any, data: dict[str, Any]) -> None:
    """The per-request costs vLLM would accept but this server bounds (a 400 naming the field and its cap)."""
    lim = front.limits
    _over("n", getattr(req, "n", None), lim.max_n, "max_n")
    best_of = data.get("best_of")  # not a field of vLLM's request types (it ignores it): bounded all the same
    if best_of is not None and (not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < 1):
        raise ServeError(400, f"best_of must be a positive integer, got {best_of!r}", "best_of")
    _over("best_of", best_of, lim.max_best_of, "max_best_of")
    for param in ("logprobs", "top_logprobs", "prompt_logprobs"):
        _over(param, getattr(req, param, None), lim.max_logprobs, "max_logprobs")
    cap = front.max_tokens_cap
    for param in ("max_tokens", "max_completion_tokens"):
        _over(param, getattr(req, param, None), cap, "max_tokens" if lim.max_tokens else "max_tokens (empty: serve.max_model_len)")


async def _next_before(stream: Any, deadline: float) -> Any:
    """The stream's next item, or TimeoutError at `deadline` (loop time)."""
    if hasattr(asyncio, "timeout_at"):  # 3.11+: a timer handle per call, not a task as wait_for makes
        async with asyncio.timeout_at(deadline):
            return await stream.__anext__()
    return await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - asyncio.get_running_loop().time()))


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def _parse(cls: type, data: dict[str, Any]) -> Any:
    from pydantic import ValidationError
    from vllm.exceptions import VLLMClientError

    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
    except (VLLMClientError, ValueError, TypeError) as e:  # vLLM's own "before" validators raise these
        raise ServeError(400, str(e), getattr(e, "parameter", None)) from None


async def _close(stream: Any) -> None:
    cancel = getattr(stream, "cancel", None)  # a Ray Serve response generator
    if cancel is not None:
        cancel()
    elif hasattr(stream, "aclose"):
        await stream.aclose()


def build_app(front: Frontend) -> FastAPI:
    app = FastAPI(title="rayllm", docs_url=None, redoc_url=None, openapi_url=None)
    types = _request_types()
    base = front.catalog.base_name

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        if err.status == 500:
            logger.exception("unhandled error")
        return _error_response(err)

    @app.get("/health")
    async def health() -> Response:
        try:
            await front.backend.check_health()
        except Exception:  # noqa: BLE001 - open to anyone: the cause goes to the log, not to the caller
            logger.warning("health check failed", exc_info=True)
            raise ServeError(503, "unhealthy", retry_after_s=1.0) from None
        return JSONResponse({"status": "healthy"})

    if front.playground:
        from importlib.resources import files

        page = files("rayllm.serve").joinpath("playground.html").read_text()

        @app.get("/playground")
        async def playground() -> HTMLResponse:  # static: what it sends goes through the /v1 routes and their keys
            return HTMLResponse(page)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if front.keys.tenants and require_api_key(front.keys, request.headers.get("authorization")) is not None:
            # the labels name every tenant's adapters: with tenants, only a global key reads them
            raise ServeError(403, "metrics need a global key (serve.api_keys or serve.admin_key), not a tenant's")
        body, content_type = front.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        scope = require_api_key(front.keys, request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": await front.catalog.model_cards(scope)})

    async def generate(kind: Kind, route: str, request: Request) -> Response:
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + front.limits.request_timeout_s
        served, stream = UNRESOLVED, None

        async def start() -> Any:
            nonlocal served, stream
            scope = require_api_key(front.keys, request.headers.get("authorization"))
            data = await _json_body(request, front.limits)
            req = _parse(types[kind], data)
            _check_caps(front, req, data)
            spec = await front.catalog.resolve(req.model, scope)
            served = spec.name if spec else base
            stream = front.backend.generate(kind, req, spec)
            first = await _next_before(stream, deadline)
            if not first.get("stream"):
                while True:  # nothing follows a whole response: let the backend finish cleanly
                    try:
                        await _next_before(stream, deadline)
                    except StopAsyncIteration:
                        break
            return first

        try:
            first = await start()
        except StopAsyncIteration:
            err = ServeError(500, "internal error: the backend sent no response")
        except (TimeoutError, asyncio.TimeoutError):
            if stream is not None:
                await _close(stream)
            err = ServeError(504, f"request timed out after {front.limits.request_timeout_s:g}s (serve.limits.request_timeout_s)")
        except Exception as e:  # noqa: BLE001 - a ServeError, Serve's back-pressure, or a dead engine (a 500, counted, logged)
            err = from_exception(e)
            if err.status == 500:
                logger.exception("request failed")
        else:
            err = None
        if err is not None:
            front.metrics.observe(*split_served_name(served, base), route, err.status, time.perf_counter() - t0)
            return _error_response(err)
        adapter, version = split_served_name(served, base)
        if not first.get("stream"):
            status, body = first["status"], first["body"]
            front.metrics.observe(adapter, version, route, status, time.perf_counter() - t0, body.get("usage"))
            return JSONResponse(body, status_code=status)
        return StreamingResponse(_relay(front, stream, adapter, version, route, t0, deadline), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate("completion", "completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate("chat", "chat", request)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        scope = require_admin_key(front.keys, request.headers.get("authorization"))
        data = await _json_body(request, front.limits)
        name, path = data.get("lora_name"), data.get("lora_path")
        require_own_adapter(scope, name)
        if not isinstance(path, str) or not path:
            raise ServeError(400, "lora_path must be a non-empty string (a local folder or an s3:// URL)", "lora_path")
        check_lora_path(path, front.lora_roots)
        replace = bool(data.get("load_inplace"))
        spec = front.catalog.add_folder(name, path, replace=replace)
        await front.backend.load(spec)  # validates (fingerprint, rank) and loads; raises on failure
        try:
            await front.catalog.commit_folder(spec, scope, replace)  # from now on every replica serves it
        except ServeError:  # the name was loaded through another replica meanwhile: its weights stay
            await front.backend.unload(spec.name)
            raise
        return Response(f"Success: LoRA adapter '{spec.name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        scope = require_admin_key(front.keys, request.headers.get("authorization"))
        data = await _json_body(request, front.limits)
        name = data.get("lora_name")
        require_own_adapter(scope, name)
        if not isinstance(name, str) or not name:
            raise ServeError(400, "lora_name must be a non-empty string", "lora_name")
        served = await front.catalog.remove_folder(name)  # new requests stop resolving to it, on every replica
        if not served and not _is_version(name):  # a registry version is unloaded from the engine only
            raise ServeError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        await front.backend.unload(name)  # returns once its in-flight requests finished
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    return app


def _is_version(name: str) -> bool:
    try:
        return AdapterRef.parse(name).version is not None
    except InvalidNameError:
        return False


async def _relay(front: Frontend, stream: Any, adapter: str, version: str, route: str, t0: float, deadline: float):
    """SSE chunks to the client; keeps the trailing usage item for the metrics."""
    ttft, usage, status, finished = None, None, 200, False
    try:
        while True:
            try:
                item = await _next_before(stream, deadline)
            except StopAsyncIteration:
                break
            if isinstance(item, str):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                yield item
            else:
                usage = item.get("usage")
        finished = True
    except (TimeoutError, asyncio.TimeoutError):  # headers are sent: report in-band, as vLLM does
        status = 504
        yield sse_error(ServeError(504, f"request timed out after {front.limits.request_timeout_s:g}s (serve.limits.request_timeout_s)"))
        yield DONE
    except Exception as e:  # noqa: BLE001
        logger.exception("stream failed")
        status = 500
        yield sse_error(ServeError(500, f"stream failed: {type(e).__name__}"))
        yield DONE
    finally:
        if not finished:  # the client went away: stop generating for it
            await _close(stream)
        front.metrics.observe(adapter, version, route, status, time.perf_counter() - t0, usage, ttft)

