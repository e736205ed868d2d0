"""A live OpenAI-compatible endpoint as an eval target: checked once up front (reachable within
`connect_timeout_s`, key accepted), then asked for every row with at most `concurrency` requests in
flight. Chat rows go to /v1/chat/completions, where the server renders them with the model's chat
template (rayllm serve renders with the same template as rayllm.chat); raw prompts go to
/v1/completions. Greedy, so the answers compare with a local target's."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from rayllm.eval.targets import EvalError

if TYPE_CHECKING:
    from rayllm.config.eval import EndpointConfig


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def headers(e: EndpointConfig) -> dict[str, str]:
    key = os.environ.get(e.api_key_env, "") if e.api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


def refusal(e: EndpointConfig, status: int, where: str) -> EvalError:
    who = f"the key in ${e.api_key_env}" if e.api_key_env else "requests without a key (set endpoint.api_key_env)"
    return EvalError(f"{where}: {base_url(e.url)} refused {who} (HTTP {status})")


def check(e: EndpointConfig, connect_timeout_s: float, where: str) -> None:
    """GET /v1/models: raises EvalError when the endpoint is unreachable, silent, or refuses the key."""
    import httpx

    url = f"{base_url(e.url)}/v1/models"
    try:
        r = httpx.get(url, headers=headers(e), timeout=httpx.Timeout(2 * connect_timeout_s, connect=connect_timeout_s))
    except httpx.TimeoutException:
        raise EvalError(f"{where}: {base_url(e.url)} did not answer within {connect_timeout_s:g} s (eval.connect_timeout_s)") from None
    except httpx.HTTPError as exc:
        raise EvalError(f"{where}: {base_url(e.url)} is unreachable ({type(exc).__name__}: {exc})") from None
    if r.status_code in (401, 403):
        raise refusal(e, r.status_code, where)
    if r.status_code != 200:
        raise EvalError(f"{where}: {url} answered HTTP {r.status_code}: {r.text[:200]}")


async def _generate(e: EndpointConfig, requests: list[dict], concurrency: int, connect_timeout_s: float,
                    request_timeout_s: float, where: str) -> list[dict]:
    """One response per request: {"text", "tokens"} or {"error"}. A refused key stops everything."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    root = base_url(e.url)

    async def one(client: httpx.AsyncClient, req: dict) -> dict:
        chat = "messages" in req
        body = {"model": e.model, "max_tokens": req["max_tokens"], "temperature": 0.0,
                **({"messages": req["messages"]} if chat else {"prompt": req["prompt"]})}
        async with sem:
            try:
                r = await client.post(f"{root}/v1/{'chat/completions' if chat else 'completions'}", json=body)
            except httpx.HTTPError as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
        if r.status_code in (401, 403):
            raise refusal(e, r.status_code, where)
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        data = r.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return {"text": text or "", "tokens": (data.get("usage") or {}).get("completion_tokens", 0)}

    timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
    async with httpx.AsyncClient(headers=headers(e), timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        return await asyncio.gather(*(one(client, req) for req in requests))


def generate(e: EndpointConfig, requests: list[dict], *, concurrency: int, connect_timeout_s: float,
             request_timeout_s: float, where: str) -> list[dict]:
    """Requests are {"messages" | "prompt", "max_tokens"}; answers in the same order."""
    return asyncio.run(_generate(e, requests, concurrency, connect_timeout_s, request_timeout_s, where))
