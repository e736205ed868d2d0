"""Bad-request fuzz over the real HTTP layer and a FakeEngine: every malformed, oversized, mistyped
or path-like request is a 4xx with OpenAI's error shape, and nothing at all is a 5xx."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.registry.store import Registry
from rayllm.serve.auth import Keys
from rayllm.serve.openai_routes import build_app

CHAT = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
ADMIN = {"authorization": "Bearer adm"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    reg = Registry(str(tmp / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp / "v1", "v1")))
    front = make_frontend(tmp, keys=Keys(admin="adm"), registry_root=str(tmp / "registry"), max_model_len=64,
                          folders={"poet": str(make_adapter_dir(tmp / "poet", "poet"))})
    with TestClient(build_app(front)) as c:
        yield c


def assert_openai_4xx(r) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
    assert isinstance(err["message"], str) and err["message"]


def nested(depth: int) -> bytes:
    return b'{"model": "base", "prompt": "x", "stop": ' + b"[" * depth + b"]" * depth + b"}"


RAW = [b"", b"{", b"{not json", b"[1, 2]", b"null", b"42", b'"text"', b"\xff\xfe\x00", b'{"model": "base", "prompt": "x"',
       b'{"model": "base", "prompt": "x"}}', nested(50), nested(200_000), b'{"model": "base", "prompt": "' + b"x" * (10 << 20) + b'"}']
BODIES = [
    {"model": "gpt-9", "prompt": "x"}, {"model": "support@v99", "prompt": "x"}, {"model": "support:nope", "prompt": "x"},
    {"model": "../x", "prompt": "x"}, {"model": "/etc/passwd", "prompt": "x"}, {"model": "a\n", "prompt": "x"},
    {"model": "support@v1\n", "prompt": "x"}, {"model": "support@v99999999999999999999", "prompt": "x"},
    {"model": "a/../../b", "prompt": "x"}, {"model": "C:\\x", "prompt": "x"}, {"model": "x" * 10_000, "prompt": "x"},
    {"model": 5, "prompt": "x"}, {"model": ["base"], "prompt": "x"}, {"model": {"a": 1}, "prompt": "x"},
    {"model": "base", "prompt": "x", "max_tokens": -1}, {"model": "base", "prompt": "x", "max_tokens": 10**30},
    {"model": "base", "prompt": "x", "max_tokens": 1e308}, {"model": "base", "prompt": "x", "max_tokens": "ten"},
    {"model": "base", "prompt": "x", "n": 10**9}, {"model": "base", "prompt": "x", "n": -4},
    {"model": "base", "prompt": "x", "temperature": "hot"}, {"model": "base", "prompt": "x", "temperature": -5},
    {"model": "base", "prompt": "x", "top_p": 99}, {"model": "base", "prompt": "x", "logprobs": 10**6},
    {"model": "base", "prompt": "x", "best_of": 10**6},
    {"model": "base", "prompt": "x", "stop": {"a": 1}}, {"model": "base", "prompt": "x", "seed": "s"},
    {"model": "base", "prompt": {"a": 1}}, {"model": "base", "prompt": [-1, 2]},
    {"model": "base", "prompt": "word " * 5000}, {"model": "base", "prompt": list(range(5000))}, {"model": "base"},
    {"model": "base", "prompt": None}, {"model": "poet", "prompt": "x", "max_tokens": 10**12},
]
CHAT_BODIES = [
    {"model": "base", "messages": "hi"}, {"model": "base", "messages": [1]},
    {"model": "base", "messages": CHAT, "top_logprobs": 10**6, "logprobs": True}, {"model": "base", "messages": CHAT, "n": 10**6},
    {"model": "base", "messages": [{"role": "user", "content": "w " * 5000}]}, {"model": "../x", "messages": CHAT},
    {"model": "base", "messages": CHAT, "max_completion_tokens": -2}, {"model": "base", "messages": CHAT, "max_tokens": 10**20},
    {"model": "base", "messages": CHAT, "tools": "all"}, {"model": "base"},
]
ADMIN_BODIES = [{}, {"lora_name": "../x", "lora_path": "/tmp"}, {"lora_name": "a\n", "lora_path": "/tmp"},
                {"lora_name": "x", "lora_path": ["/tmp"]}, {"lora_name": 5, "lora_path": "/tmp"},
                {"lora_name": "x", "lora_path": "../../etc"}, {"lora_name": "x", "lora_path": "/etc/passwd"},
                {"lora_name": "x", "lora_path": "file:///etc"}]


@pytest.mark.parametrize("raw", RAW, ids=lambda b: f"{len(b)}B:{b[:16]!r}")
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"])
def test_malformed_raw_bodies(client, route, raw):
    assert_openai_4xx(client.post(route, content=raw, headers={**JSON, **ADMIN}))


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b)[:60])
def test_bad_completion_requests(client, body):
    assert_openai_4xx(client.post("/v1/completions", json=body))
    assert_openai_4xx(client.post("/v1/completions", json={**body, "stream": True} if "stream" not in body else body))


@pytest.mark.parametrize("body", CHAT_BODIES, ids=lambda b: json.dumps(b)[:60])
def test_bad_chat_requests(client, body):
    assert_openai_4xx(client.post("/v1/chat/completions", json=body))


@pytest.mark.parametrize("body", ADMIN_BODIES, ids=lambda b: json.dumps(b)[:60])
def test_bad_admin_requests(client, body):
    assert_openai_4xx(client.post("/v1/load_lora_adapter", json=body, headers=ADMIN))
    assert_openai_4xx(client.post("/v1/unload_lora_adapter", json={"lora_name": body.get("lora_name", "")}, headers=ADMIN))


def test_random_mutations_never_5xx(client):
    """Valid requests with one to three fields replaced by values of random types: answered or refused, never a 5xx."""
    rng = random.Random(15)
    junk = [None, True, -1, 0, 2**63, -2**70, 1e308, float("-inf"), "", "x" * 3000, "../x", "a\n", [], [None], [[[]]],
            {"$ref": "#"}, {"": {}}, "base", "support@v1", "poet", 0.5, [1, "a"], {"role": "user"}]
    fields = ["model", "prompt", "messages", "max_tokens", "n", "temperature", "top_p", "logprobs", "stream", "stop", "seed",
              "echo", "best_of", "stream_options", "top_logprobs", "max_completion_tokens", "presence_penalty",
              "logit_bias", "response_format", "tools", "user", "prompt_logprobs", "min_tokens", "ignore_eos"]
    seen = set()
    for i in range(400):
        chat = i % 2 == 1
        body = {"model": "base", "max_tokens": 2, **({"messages": CHAT} if chat else {"prompt": "x"})}
        for f in rng.sample(fields, rng.randint(1, 3)):
            body[f] = rng.choice(junk)
        try:
            payload = json.dumps(body, allow_nan=True)
        except ValueError:
            continue
        r = client.post("/v1/chat/completions" if chat else "/v1/completions", content=payload.encode(), headers=JSON)
        seen.add(r.status_code)
        assert r.status_code < 500, (body, r.text[:300])
        if r.status_code >= 400:
            assert_openai_4xx(r)
    assert 200 in seen and 400 in seen
