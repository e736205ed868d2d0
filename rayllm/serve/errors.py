"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

Every client mistake maps to a 4xx with a message that names the field; a 500 means a bug or a
dead engine, never bad input. Error types follow vLLM's names so clients of either see the same.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ServeError(Exception):
    """An error with its HTTP status; raised anywhere in serving, rendered once by the routes."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(self.status, HTTPStatus(self.status).phrase.replace(" ", "") + "Error")
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # crosses Ray process boundaries with its status intact
        return (ServeError, (self.status, self.message, self.param, self.type, self.retry_after_s))

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.type)

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}  # RFC 9110: whole seconds


def error_body(status: int, message: str, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "Error"), "param": param, "code": status}}


def from_validation_error(exc: Any) -> ServeError:
    """A pydantic ValidationError of a request body → 400 naming every bad field."""
    problems, first = [], None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        field = loc.split(".")[0] if loc else None  # the top-level field; the rest names a union member tried
        first = first or field
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        problems.append(f"{loc or 'body'}: {msg}")
    seen = list(dict.fromkeys(problems))
    return ServeError(400, "invalid request: " + "; ".join(seen[:8]), param=first)


def from_vllm_error(error: Any) -> ServeError:
    """vLLM's ErrorResponse (or its dict) → ServeError with the same status."""
    info = error["error"] if isinstance(error, dict) else error.error.model_dump()
    return ServeError(int(info.get("code") or 500), str(info.get("message")), info.get("param"), info.get("type"))


def from_vllm_exception(exc: Exception) -> ServeError:
    """An exception vLLM raised for a request (context too long, bad sampling params) → ServeError,
    with vLLM's own mapping of exception types to statuses."""
    from vllm.entrypoints.serve import create_error_response

    return from_vllm_error(create_error_response(exc))


def from_exception(exc: BaseException) -> ServeError:
    """An exception that reached the HTTP layer → what the client sees. Serve's back-pressure (the
    queue of `serve.limits.max_queued_requests` is full) and an unavailable deployment are 503s
    with Retry-After; anything else is a 500 naming only the exception's type (the cause is logged)."""
    if isinstance(exc, ServeError):
        return exc
    try:  # Serve is imported wherever these can be raised; unit tests without it see only the 500
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover
        BackPressureError = DeploymentUnavailableError = ()  # type: ignore[assignment]
    if isinstance(exc, BackPressureError):
        return ServeError(503, "the server is overloaded (its request queue is full); retry later",
                          retry_after_s=exc.retry_after_s if exc.retry_after_s is not None else 1.0)
    if isinstance(exc, DeploymentUnavailableError):
        return ServeError(503, "the model server is unavailable; retry later", retry_after_s=1.0)
    return ServeError(500, f"internal error: {type(exc).__name__}")


def sse_error(err: ServeError) -> str:
    """An error that happens after a stream has started: one SSE event, then the stream ends."""
    return f"data: {json.dumps(err.body())}\n\n"
