"""API keys for /v1/*, a separate admin key for adapter management, constant-time comparison."""

from __future__ import annotations

import hmac

import pytest
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.serve.auth import Keys, require_api_key
from rayllm.serve.errors import ServeError
from rayllm.serve.openai_routes import build_app


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_keys_merge_config_and_environment():
    keys = Keys.from_config(["k1"], None, env={"RAYLLM_API_KEYS": " k2, ,k1", "RAYLLM_ADMIN_KEY": "adm"})
    assert keys.api == ("k1", "k2") and keys.admin == "adm"
    assert Keys.from_config([], "cfg-admin", env={"RAYLLM_ADMIN_KEY": "env"}).admin == "cfg-admin"
    assert Keys.from_config([], None, env={}) == Keys()


def test_comparison_is_constant_time_over_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    require_api_key(Keys(api=("first", "second", "third")), "Bearer first")
    assert len(calls) == 3  # no early exit on the first match
    with pytest.raises(ServeError):
        require_api_key(Keys(api=("first",)), "Bearer firs")


@pytest.fixture
def client(tmp_path):
    front = make_frontend(tmp_path, keys=Keys(api=("user-key",), admin="admin-key"))
    with TestClient(build_app(front)) as c:
        yield c


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    (bearer("wrong"), 401),
    ({"authorization": "Basic user-key"}, 401),
    ({"authorization": "Bearer"}, 401),
    (bearer("user-key"), 200),
    (bearer("admin-key"), 200),
])
def test_v1_routes_need_an_api_key(client, headers, status):
    for method, path, body in [("post", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 1}),
                               ("post", "/v1/chat/completions", {"model": "base", "max_tokens": 1,
                                                                 "messages": [{"role": "user", "content": "x"}]}),
                               ("get", "/v1/models", None)]:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == status, (path, r.text)
        if status == 401:
            assert r.json()["error"]["type"] == "AuthenticationError"


def test_health_and_metrics_are_open(client):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_admin_routes_need_the_admin_key(client, tmp_path):
    folder = str(make_adapter_dir(tmp_path / "x", "x"))
    load = {"lora_name": "x", "lora_path": folder}
    assert client.post("/v1/load_lora_adapter", json=load).status_code == 401
    r = client.post("/v1/load_lora_adapter", json=load, headers=bearer("user-key"))
    assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDeniedError"
    assert client.post("/v1/load_lora_adapter", json=load, headers=bearer("nope")).status_code == 401
    assert client.post("/v1/load_lora_adapter", json=load, headers=bearer("admin-key")).status_code == 200
    r = client.post("/v1/completions", json={"model": "x", "prompt": "p", "max_tokens": 1}, headers=bearer("user-key"))
    assert r.json()["model"] == "x"
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=bearer("user-key")).status_code == 403
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=bearer("admin-key")).status_code == 200
    r = client.post("/v1/completions", json={"model": "x", "prompt": "p"}, headers=bearer("user-key"))
    assert r.status_code == 404


def test_admin_routes_are_off_without_an_admin_key(tmp_path):
    front = make_frontend(tmp_path, keys=Keys())
    with TestClient(build_app(front)) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)}, headers=bearer("anything"))
        assert r.status_code == 404 and "disabled" in r.json()["error"]["message"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 404
        # /v1/* stays open when no API keys are configured
        assert c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 1}).status_code == 200
