"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

Every client mistake maps to a 4xx with a message that names the field; a 500 means a bug or a
dead engine, never bad input. Error types follow vLLM's names so clients of either see the same.
"""

from __future__ import annotations

import json
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
    503: "ServiceUnavailableError",
}


class ServeError(Exception):
    """An error with its HTTP status; raised anywhere in serving, rendered once by the routes."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(self.status, HTTPStatus(self.status).phrase.replace(" ", "") + "Error")

    def __reduce__(self):  # crosses Ray process boundaries with its status intact
        return (ServeError, (self.status, self.message, self.param, self.type))

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.type)


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


def sse_error(err: ServeError) -> str:
    """An error that happens after a stream has started: one SSE event, then the stream ends."""
    return f"data: {json.dumps(err.body())}\n\n"
