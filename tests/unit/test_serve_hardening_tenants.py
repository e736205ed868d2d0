"""Per-key tenant scopes (serve.tenants): a tenant's key calls and lists only its own adapters (and
the base when shared), another tenant's adapter is a 404 indistinguishable from an unknown name,
and a tenant's admin key manages only its own names."""

from __future__ import annotations

import json

import pytest
import yaml
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.config import parse_config
from rayllm.registry.store import Registry
from rayllm.serve.auth import Keys
from rayllm.serve.openai_routes import build_app

TENANTS = {
    "acme": {"keys": ["k-acme"], "adapters": ["support", "poet", "acme-tool"], "admin_key": "k-acme-admin"},
    "globex": {"keys": ["k-globex"], "adapters": ["other"], "base": False, "admin_key": "k-globex-admin"},
}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def client(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp_path / "train" / "s1", "s1")))
    reg.promote("support:prod", 1)
    reg.publish("other", str(make_adapter_dir(tmp_path / "train" / "o1", "o1")))
    cfg = parse_config({"serve": {"model": "/m", "api_keys": ["k-all"], "admin_key": "k-admin", "tenants": TENANTS}}).serve
    keys = Keys.from_config(cfg.api_keys, cfg.admin_key, env={}, tenants=cfg.tenants)
    front = make_frontend(tmp_path, keys=keys, registry_root=str(tmp_path / "registry"),
                          folders={"poet": str(make_adapter_dir(tmp_path / "poet", "poet"))})
    with TestClient(build_app(front)) as c:
        yield c


def call(c, key, model):
    return c.post("/v1/completions", headers=bearer(key), json={"model": model, "prompt": "x", "max_tokens": 1})


def test_a_tenant_calls_only_its_adapters_and_others_look_unknown(client):
    for model in ("base", "support", "support@v1", "support:prod", "poet"):
        assert call(client, "k-acme", model).status_code == 200, model
    for model in ("other", "other@v1"):
        theirs, unknown = call(client, "k-acme", model), call(client, "k-acme", model.replace("other", "zzzzz"))
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json() == json.loads(unknown.text.replace("zzzzz", "other"))  # the same answer, name for name
    assert call(client, "k-globex", "other@v1").status_code == 200
    for model in ("base", "support", "poet"):  # globex does not share the base
        assert call(client, "k-globex", model).status_code == 404, model
    for model in ("base", "support@v1", "other", "poet"):  # a global key reaches everything
        assert call(client, "k-all", model).status_code == 200, model


def test_models_lists_only_what_the_key_may_call(client):
    def ids(key):
        return {m["id"] for m in client.get("/v1/models", headers=bearer(key)).json()["data"]}

    assert ids("k-acme") == {"base", "poet", "support", "support@v1", "support:prod"}
    assert ids("k-globex") == {"other", "other@v1"}
    assert ids("k-all") >= ids("k-acme") | ids("k-globex")
    assert client.get("/v1/models", headers=bearer("k-wrong")).status_code == 401


def test_a_tenant_admin_key_manages_only_its_own_names(client, tmp_path):
    folder = str(make_adapter_dir(tmp_path / "tool", "tool"))

    def load(key, name):
        return client.post("/v1/load_lora_adapter", headers=bearer(key), json={"lora_name": name, "lora_path": folder})

    def unload(key, name):
        return client.post("/v1/unload_lora_adapter", headers=bearer(key), json={"lora_name": name})

    assert load("k-acme", "acme-tool").status_code == 403  # an API key, not an admin key
    r = load("k-acme-admin", "globex-tool")
    assert r.status_code == 403 and "acme" in r.json()["error"]["message"]
    assert load("k-globex-admin", "acme-tool").status_code == 403
    assert load("k-acme-admin", "acme-tool").status_code == 200
    assert call(client, "k-acme", "acme-tool").status_code == 200
    assert call(client, "k-globex", "acme-tool").status_code == 404
    assert unload("k-globex-admin", "acme-tool").status_code == 403
    assert unload("k-acme-admin", "other@v1").status_code == 403
    assert unload("k-acme-admin", "acme-tool").status_code == 200
    assert load("k-admin", "anything").status_code == 200  # the global admin key manages every name


def test_tenant_keys_are_secrets_and_count_as_keys(monkeypatch):
    monkeypatch.delenv("RAYLLM_API_KEYS", raising=False)
    cfg = parse_config({"serve": {"model": "/m", "host": "0.0.0.0", "tenants": TENANTS}})  # keys: not open
    dumped = yaml.safe_dump(cfg.model_dump(mode="json")) + repr(cfg) + repr(Keys.from_config([], None, env={}, tenants=cfg.serve.tenants))
    assert "k-acme" not in dumped and "k-globex" not in dumped
    assert cfg.serve.tenants["acme"].keys[0].get_secret_value() == "k-acme"
    with pytest.raises(Exception, match="plain names"):
        parse_config({"serve": {"model": "/m", "tenants": {"t": {"keys": ["k"], "adapters": ["support@v1"]}}}})
    with pytest.raises(Exception) as e:
        parse_config({"serve": {"model": "/m", "tenants": {"t": {"keys": "k-secret-value"}}}})
    assert "k-secret-value" not in str(e.value)


def test_metrics_name_every_adapter_so_tenants_cannot_read_them(client):
    call(client, "k-globex", "other@v1")
    assert client.get("/metrics", headers=bearer("k-acme")).status_code == 403
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers=bearer("k-all"))
    assert r.status_code == 200 and 'adapter="other"' in r.text
