"""Bounded everything: body size, JSON depth, sampling caps, time, Serve's queue, and what a stream of
made-up `model` names costs (memory and storage calls). FakeEngine under the real HTTP layer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import FakeEngine, make_adapter_dir, make_frontend, sse_events

from rayllm.config import ConfigError, parse_config
from rayllm.config.serve import ServeLimits
from rayllm.registry.store import Registry
from rayllm.serve.openai_routes import build_app


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def client_for(tmp_path, **kw) -> TestClient:
    return TestClient(build_app(make_frontend(tmp_path, **kw)))


def test_body_over_the_limit_is_413_with_or_without_content_length(tmp_path):
    c = client_for(tmp_path, limits=ServeLimits(max_body_bytes=4096))
    big = b'{"model": "base", "prompt": "' + b"x" * 5000 + b'"}'
    err = error_of(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert "4096" in err["message"] and "max_body_bytes" in err["message"]
    chunked = iter([big[:3000], big[3000:]])  # no Content-Length: counted while it streams in
    error_of(c.post("/v1/completions", content=chunked, headers={"content-type": "application/json"}), 413)
    assert c.post("/v1/completions", json={"model": "base", "prompt": "x " * 20, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_400(tmp_path, depth):
    c = client_for(tmp_path)
    body = '{"model": "base", "prompt": "x", "stop": ' + "[" * depth + "]" * depth + "}"
    err = error_of(c.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"}), 400)
    assert "nested deeper than 32" in err["message"]


@pytest.mark.parametrize("route,extra,param,cap", [
    ("/v1/completions", {"n": 17}, "n", 16),
    ("/v1/completions", {"best_of": 40}, "best_of", 16),
    ("/v1/completions", {"logprobs": 21}, "logprobs", 20),
    ("/v1/completions", {"prompt_logprobs": 50}, "prompt_logprobs", 20),
    ("/v1/completions", {"max_tokens": 65}, "max_tokens", 64),
    ("/v1/completions", {"max_tokens": 10**18}, "max_tokens", 64),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", 20),
    ("/v1/chat/completions", {"max_completion_tokens": 100}, "max_completion_tokens", 64),
])
def test_sampling_caps_are_400_naming_field_and_cap(tmp_path, route, extra, param, cap):
    c = client_for(tmp_path, max_model_len=64)
    body = {"model": "base", **({"prompt": "x"} if "chat" not in route else {"messages": [{"role": "user", "content": "x"}]})}
    err = error_of(c.post(route, json={**body, **extra}), 400)
    assert err["param"] == param and f"at most {cap}" in err["message"], err


def test_max_tokens_cap_from_config_and_values_under_the_caps_pass(tmp_path):
    c = client_for(tmp_path, limits=ServeLimits(max_tokens=4, max_n=2))
    err = error_of(c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 5}), 400)
    assert "at most 4 (serve.limits.max_tokens)" in err["message"]
    r = c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 4, "n": 2, "best_of": 2})
    assert r.status_code == 200, r.text
    error_of(c.post("/v1/completions", json={"model": "base", "prompt": "x", "best_of": "two"}), 400)


def test_request_timeout_is_504_whole_or_in_band_for_a_stream(tmp_path):
    c = client_for(tmp_path, engine=FakeEngine(max_model_len=512, chunk_delay=0.05), limits=ServeLimits(request_timeout_s=0.2))
    err = error_of(c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 40}), 504)
    assert "request_timeout_s" in err["message"]
    r = c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 40, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
    assert 0 < len(events) - 2 < 40  # some chunks came, then the deadline
    assert c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_serve_back_pressure_is_503_with_retry_after(tmp_path):
    from ray.serve.exceptions import BackPressureError

    front = make_frontend(tmp_path)

    def overloaded(kind, request, spec):
        raise BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=2.5)

    front.backend.generate = overloaded
    with TestClient(build_app(front)) as c:
        r = c.post("/v1/completions", json={"model": "base", "prompt": "x"})
        err = error_of(r, 503)
        assert r.headers["retry-after"] == "3" and "overloaded" in err["message"]


class CountingRegistry:
    """Counts every registry call the catalog makes (each is a storage listing or read)."""

    def __init__(self, registry: Registry):
        self.registry, self.calls = registry, []

    def __getattr__(self, name):
        attr = getattr(self.registry, name)
        if not callable(attr):
            return attr

        def counted(*a, **kw):
            self.calls.append(name)
            return attr(*a, **kw)
        return counted


def test_unknown_names_cost_no_storage_call_each_and_caches_stay_bounded(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp_path / "v1", "v1-weights")))
    front = make_frontend(tmp_path, registry_root=str(tmp_path / "registry"),
                          limits=ServeLimits(model_cache_size=16, unknown_model_cache_s=60))
    counting = front.catalog._registry = CountingRegistry(reg)
    front.catalog._cache.ttl_s = 60.0  # serve.registry_refresh_s (0 in make_frontend)
    with TestClient(build_app(front)) as c:
        for i in range(300):
            error_of(c.post("/v1/completions", json={"model": f"nope-{i}", "prompt": "x"}), 404)
        assert counting.calls == ["names"]  # one listing for 300 unknown names
        for i in range(2, 60):  # made-up versions and aliases of a real name
            error_of(c.post("/v1/completions", json={"model": f"support@v{i}", "prompt": "x"}), 404)
            error_of(c.post("/v1/completions", json={"model": f"support:a{i}", "prompt": "x"}), 404)
        assert sorted(counting.calls) == ["aliases", "names", "versions"]  # one listing each, not one call per ref
        assert len(front.catalog._cache) <= 16 and len(front.catalog._versions) <= 16  # and bounded caches
        assert c.post("/v1/completions", json={"model": "support@v1", "prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("model", ["support\n", "support@v1\n", "support@v1234567890", "support@v01", "a\x00b"])
def test_names_match_in_full_and_versions_are_short(tmp_path, model):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp_path / "v1", "v1-weights")))
    c = client_for(tmp_path, registry_root=str(tmp_path / "registry"))
    r = c.post("/v1/completions", json={"model": model, "prompt": "x"})
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == "model", r.text
    if "\n" in model or "1234567890" in model:
        assert r.status_code == 400 and "invalid model name" in r.json()["error"]["message"]


def test_config_names_and_load_route_names_match_in_full(tmp_path):
    with pytest.raises(ConfigError, match="invalid"):
        parse_config({"serve": {"model": "/m", "adapters": {"poet\n": "/p"}}})
    from rayllm.serve.auth import Keys

    c = client_for(tmp_path, keys=Keys(admin="adm"))
    err = error_of(c.post("/v1/load_lora_adapter", headers={"authorization": "Bearer adm"},
                          json={"lora_name": "poet\n", "lora_path": str(tmp_path)}), 400)
    assert err["param"] == "lora_name"
