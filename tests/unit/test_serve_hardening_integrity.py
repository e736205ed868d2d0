"""A registry version whose stored files fail their check is refused with a 502 (a server-side fault,
not the caller's, and not a 500 or a hang); a bad name is the caller's 4xx; every other adapter keeps
serving. Local registry, files corrupted on disk, FakeEngine under the real HTTP layer."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.registry.store import Registry
from rayllm.serve.openai_routes import build_app


@pytest.fixture
def world(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    for tag in ("v1", "v2"):
        reg.publish("support", str(make_adapter_dir(tmp_path / "train" / tag, tag)))
    reg.publish("other", str(make_adapter_dir(tmp_path / "train" / "other", "other")))
    reg.publish("meta", str(make_adapter_dir(tmp_path / "train" / "meta", "meta")))
    reg.publish("extra", str(make_adapter_dir(tmp_path / "train" / "extra", "extra")))
    reg.promote("support:prod", 1)
    root = tmp_path / "registry"
    (root / "support" / "v1" / "weights.txt").write_text("tampered")  # checksum mismatch
    (root / "meta" / "v1" / "manifest.json").write_text("{not json")  # unreadable manifest
    (root / "extra" / "v1" / "planted.py").write_text("print('hi')")  # a file the manifest does not list
    front = make_frontend(tmp_path, registry_root=str(root))
    with TestClient(build_app(front)) as c:
        yield c


def post(c, model):
    return c.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ["support@v1", "support:prod", "meta@v1", "meta", "extra@v1"])
def test_corrupt_version_is_502_and_the_rest_keeps_serving(world, model):
    for _ in range(2):  # refused again, not cached as loaded and not hanging
        r = post(world, model)
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == "model"
        assert "integrity" in err["message"] and "/tmp" not in err["message"]  # no storage paths to the caller
    for ok, tag in [("support@v2", "v2"), ("support", "v2"), ("other", "other"), ("base", "base")]:
        r = post(world, ok)
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(f"{tag}:"), r.text


@pytest.mark.parametrize("model,status", [("support@v9", 404), ("support:nope", 404), ("nope@v1", 404),
                                          ("../support", 400), ("support/v1", 400)])
def test_bad_names_are_the_callers_4xx(world, model, status):
    r = post(world, model)
    assert r.status_code == status and r.json()["error"]["code"] == status, r.text


def test_models_listing_survives_a_corrupt_manifest(world):
    r = world.get("/v1/models")
    assert r.status_code == 200, r.text
    assert {"support@v2", "other@v1"} <= {m["id"] for m in json.loads(r.text)["data"]}


def test_a_refused_version_is_not_hashed_again_on_every_request(tmp_path, monkeypatch):
    from rayllm.registry import fingerprint

    reg = Registry(str(tmp_path / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp_path / "v1", "v1")))
    (tmp_path / "registry" / "support" / "v1" / "weights.txt").write_text("tampered")
    hashed = []
    real = fingerprint.hash_file
    monkeypatch.setattr(fingerprint, "hash_file", lambda *a: hashed.append(a[1]) or real(*a))
    with TestClient(build_app(make_frontend(tmp_path, registry_root=str(tmp_path / "registry")))) as c:
        for _ in range(20):
            assert post(c, "support@v1").status_code == 502
    assert 0 < len(hashed) <= 3  # one check of the version's files, not one per request
