"""Keys and what the endpoint tells: no open endpoint on a public host by accident, keys as secrets
(never in dumps, reprs, errors or the replicas' bound config), no paths in /v1/models or /health,
and the load route confined to serve.lora_roots."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.config import ConfigError, parse_config
from rayllm.registry.store import Registry
from rayllm.serve.auth import Keys
from rayllm.serve.folders import check_lora_path
from rayllm.serve.openai_routes import build_app

SECRET, ADMIN_SECRET = "sk-test-4f1c9e", "sk-admin-77d0b2"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "serve.example.com"])
def test_public_host_without_keys_is_refused_unless_allowed(host, monkeypatch):
    monkeypatch.delenv("RAYLLM_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        parse_config({"serve": {"model": "/m", "host": host}})
    assert parse_config({"serve": {"model": "/m", "host": host, "allow_unauthenticated": True}}).serve.host == host
    assert parse_config({"serve": {"model": "/m", "host": host, "api_keys": [SECRET]}}).serve.host == host
    monkeypatch.setenv("RAYLLM_API_KEYS", SECRET)
    assert parse_config({"serve": {"model": "/m", "host": host}}).serve.host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_host_may_be_open(host, monkeypatch):
    monkeypatch.delenv("RAYLLM_API_KEYS", raising=False)
    assert parse_config({"serve": {"model": "/m", "host": host}}).serve.api_keys == []


def test_keys_never_appear_in_dumps_reprs_or_errors():
    cfg = parse_config({"serve": {"model": "/m", "api_keys": [SECRET], "admin_key": ADMIN_SECRET}})
    assert Keys.from_config(cfg.serve.api_keys, cfg.serve.admin_key, env={}) == Keys(api=(SECRET,), admin=ADMIN_SECRET)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True))  # what a run folder's config.yaml holds
    shown = [config_yaml, json.dumps(cfg.model_dump(mode="json")), repr(cfg), str(cfg.serve), repr(cfg.model_dump()),
             repr(Keys.from_config(cfg.serve.api_keys, cfg.serve.admin_key, env={}))]
    with pytest.raises(ConfigError) as e:  # a refused config that holds keys
        parse_config({"serve": {"model": "/m", "api_keys": [SECRET], "admin_key": ADMIN_SECRET, "max_loras": 9}})
    shown.append(str(e.value))
    with pytest.raises(ConfigError) as e:  # keys of the wrong type: the error names the key, not the value
        parse_config({"serve": {"model": "/m", "api_keys": SECRET}})
    shown.append(str(e.value))
    for text in shown:
        assert SECRET not in text and ADMIN_SECRET not in text, text
    assert parse_config(yaml.safe_load(config_yaml)).serve.api_keys == []  # a copy served again needs its keys given anew


@pytest.mark.parametrize("topology", ["split", "single"])
def test_serve_application_carries_no_key_in_its_config(tmp_path, caplog, topology):
    from rayllm.serve.app import build_application

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = parse_config({"serve": {"model": str(tmp_path / "base"), "api_keys": [SECRET], "admin_key": ADMIN_SECRET,
                                  "topology": topology}}).serve
    app = build_application(cfg, None)
    ingress = app._bound_deployment
    if topology == "single":  # the LLM replica is the ingress
        deployments = [(ingress, ingress.init_args[0])]
    else:
        llm = ingress.init_args[0]._bound_deployment if hasattr(ingress.init_args[0], "_bound_deployment") else ingress.init_args[0]
        deployments = [(ingress, ingress.init_args[1]), (llm, llm.init_args[0])]
    for bound, served in deployments:
        assert Keys.from_config(served.api_keys, served.admin_key, env={}).api == (SECRET,)  # the replicas get them
        text = repr(bound.init_args) + json.dumps(served.model_dump(mode="json")) + repr(bound._deployment_config)
        assert SECRET not in text and ADMIN_SECRET not in text
    assert SECRET not in caplog.text


def test_open_public_endpoint_is_logged_at_start(tmp_path, caplog, monkeypatch):
    from rayllm.serve.app import build_application

    monkeypatch.delenv("RAYLLM_API_KEYS", raising=False)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = parse_config({"serve": {"model": str(tmp_path / "base"), "host": "0.0.0.0", "allow_unauthenticated": True}}).serve
    build_application(cfg, None)
    assert "open to anyone" in caplog.text and "0.0.0.0" in caplog.text


def test_models_and_health_show_no_paths_or_internals(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp_path / "train" / "v1", "v1")))
    reg.promote("support:prod", 1)
    front = make_frontend(tmp_path, folders={"poet": str(make_adapter_dir(tmp_path / "poet", "poet"))},
                          registry_root=str(tmp_path / "registry"))
    with TestClient(build_app(front)) as c:
        body = c.get("/v1/models").text
        assert {"poet", "support@v1", "support:prod"} <= {m["id"] for m in json.loads(body)["data"]}
        assert str(tmp_path) not in body and "/" not in body
        r = c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "healthy"}
        front.backend.core.engine.healthy = False
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "unhealthy" and "FakeEngine" not in r.text


def test_load_route_only_loads_from_configured_roots(tmp_path):
    root = tmp_path / "adapters"
    inside = make_adapter_dir(root / "ok", "ok")
    outside = make_adapter_dir(tmp_path / "elsewhere", "x")
    os.symlink(outside, root / "link")
    front = make_frontend(tmp_path, keys=Keys(admin="adm"), lora_roots=(str(root), "s3://bucket/adapters"))
    admin = {"authorization": "Bearer adm"}
    with TestClient(build_app(front)) as c:
        def load(path):
            return c.post("/v1/load_lora_adapter", headers=admin, json={"lora_name": "n", "lora_path": path})

        for path, status in [(str(outside), 403), (str(root / "link"), 403), (str(root / ".." / "elsewhere"), 403),
                             ("/etc", 403), ("relative/dir", 400), ("file:///etc", 400), ("http://example.com/a", 400),
                             ("s3://other/adapters/a", 403), ("s3://bucket/adapters-evil/a", 403),
                             ("s3://bucket/adapters/../x", 400)]:
            r = load(path)
            assert r.status_code == status and r.json()["error"]["param"] == "lora_path", (path, r.text)
        assert load(str(inside)).status_code == 200
    assert check_lora_path("s3://bucket/adapters/a/v1", ("s3://bucket/adapters",)) == "s3://bucket/adapters/a/v1"
    with pytest.raises(Exception, match="lora_roots"):  # nothing configured: the route loads nothing
        check_lora_path(str(inside), ())
