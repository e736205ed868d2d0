"""The HTTP layer: OpenAI-compatible routes over a `Backend`, with vLLM's own protocol types.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with SSE), GET /v1/models,
GET /health, GET /metrics, GET /playground when `serve.playground` is on (a static page that calls
the /v1 routes like any client), and — only when an admin key is configured — vLLM's
POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter.

Bodies are parsed here, not by FastAPI, so every mistake (bad JSON, wrong type, unknown model,
prompt too long, incompatible adapter) comes back as OpenAI-style error JSON with a 4xx.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from rayllm.registry.names import AdapterRef, InvalidNameError
from rayllm.serve.adapters import AdapterCatalog
from rayllm.serve.auth import Keys, require_admin_key, require_api_key
from rayllm.serve.errors import ServeError, from_validation_error, sse_error
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


def _request_types() -> dict[Kind, type]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"completion": CompletionRequest, "chat": ChatCompletionRequest}


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ServeError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ServeError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


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
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        err = ServeError(500, f"internal error: {type(exc).__name__}")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        try:
            await front.backend.check_health()
        except ServeError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead replica is "unavailable", not a bug in this route
            raise ServeError(503, f"engine unavailable: {type(e).__name__}") from None
        return Response(status_code=200)

    if front.playground:
        from importlib.resources import files

        page = files("rayllm.serve").joinpath("playground.html").read_text()

        @app.get("/playground")
        async def playground() -> HTMLResponse:  # static: what it sends goes through the /v1 routes and their keys
            return HTMLResponse(page)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = front.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        require_api_key(front.keys, request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": await front.catalog.model_cards()})

    async def generate(kind: Kind, route: str, request: Request) -> Response:
        t0 = time.perf_counter()
        served = UNRESOLVED
        try:
            require_api_key(front.keys, request.headers.get("authorization"))
            req = _parse(types[kind], await _json_body(request))
            spec = await front.catalog.resolve(req.model)
            served = spec.name if spec else base
            stream = front.backend.generate(kind, req, spec)
            first = await stream.__anext__()
        except ServeError as e:
            front.metrics.observe(*split_served_name(served, base), route, e.status, time.perf_counter() - t0)
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # noqa: BLE001 - e.g. the engine died: a 500 that is counted, with the cause logged
            logger.exception("request failed")
            front.metrics.observe(*split_served_name(served, base), route, 500, time.perf_counter() - t0)
            return JSONResponse(ServeError(500, f"internal error: {type(e).__name__}").body(), status_code=500)
        adapter, version = split_served_name(served, base)
        if not first.get("stream"):
            async for _ in stream:  # nothing follows a whole response: let the backend finish cleanly
                pass
            status, body = first["status"], first["body"]
            front.metrics.observe(adapter, version, route, status, time.perf_counter() - t0, body.get("usage"))
            return JSONResponse(body, status_code=status)
        return StreamingResponse(_relay(front, stream, adapter, version, route, t0), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate("completion", "completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate("chat", "chat", request)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        require_admin_key(front.keys, request.headers.get("authorization"))
        data = await _json_body(request)
        name, path = data.get("lora_name"), data.get("lora_path")
        if not isinstance(path, str) or not path:
            raise ServeError(400, "lora_path must be a non-empty string (a local folder or an s3:// URL)", "lora_path")
        spec = front.catalog.add_folder(name, path, replace=bool(data.get("load_inplace")))
        await front.backend.load(spec)  # validates (fingerprint, rank) and loads; raises on failure
        front.catalog.commit_folder(spec)
        return Response(f"Success: LoRA adapter '{spec.name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        require_admin_key(front.keys, request.headers.get("authorization"))
        data = await _json_body(request)
        name = data.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ServeError(400, "lora_name must be a non-empty string", "lora_name")
        folder = front.catalog.remove_folder(name)  # new requests stop resolving to it right away
        if folder is None and not _is_version(name):  # a registry version is unloaded from the engine only
            raise ServeError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        await front.backend.unload(name)  # returns once its in-flight requests finished
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    return app


def _is_version(name: str) -> bool:
    try:
        return AdapterRef.parse(name).version is not None
    except InvalidNameError:
        return False


async def _relay(front: Frontend, stream: Any, adapter: str, version: str, route: str, t0: float):
    """SSE chunks to the client; keeps the trailing usage item for the metrics."""
    ttft, usage, status, finished = None, None, 200, False
    try:
        async for item in stream:
            if isinstance(item, str):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                yield item
            else:
                usage = item.get("usage")
        finished = True
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as vLLM does
        logger.exception("stream failed")
        status = 500
        yield sse_error(ServeError(500, f"stream failed: {type(e).__name__}"))
        yield DONE
    finally:
        if not finished:  # the client went away: stop generating for it
            await _close(stream)
        front.metrics.observe(adapter, version, route, status, time.perf_counter() - t0, usage, ttft)

