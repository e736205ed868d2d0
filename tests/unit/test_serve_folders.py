"""The one path from a request's adapter to the folder vLLM loads: local registry versions are
verified too, once per version per replica; a tampered version is refused with the reason."""

from __future__ import annotations

from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.registry import fingerprint
from rayllm.registry.store import Registry
from rayllm.serve.folders import AdapterFolders
from rayllm.serve.openai_routes import build_app
from rayllm.serve.protocol import AdapterSpec


def test_a_local_registry_version_is_verified_once_and_served_in_place(tmp_path, monkeypatch):
    reg = Registry(str(tmp_path / "registry"))
    ref = reg.publish("support", str(make_adapter_dir(tmp_path / "ad", "v1-weights")))
    hashed = []
    real = fingerprint.check_file
    monkeypatch.setattr("rayllm.registry.store.check_file", lambda *a: hashed.append(a[2]) or real(*a))
    folders = AdapterFolders(tmp_path / "stage")
    spec = AdapterSpec(ref, reg.resolve(ref, verify=False).path, registry_root=reg.url(reg.root))
    first = folders.local(spec)
    assert first == reg.resolve(ref, verify=False).path  # no copy of a local version
    n = len(hashed)
    assert n == 3  # every file of the version, once
    assert folders.local(spec) == first and len(hashed) == n  # the next load trusts the verified immutable version
    assert not (tmp_path / "stage").exists()


def test_a_tampered_local_registry_version_is_refused_with_the_reason(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("support", str(make_adapter_dir(tmp_path / "ad", "v1-weights")))
    (tmp_path / "registry" / "support" / "v1" / "weights.txt").write_text("swapped-weights")
    front = make_frontend(tmp_path, registry_root=str(tmp_path / "registry"))
    with TestClient(build_app(front)) as client:
        r = client.post("/v1/completions", json={"model": "support@v1", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 502, r.text  # the registry's fault, not the caller's
        assert "checksum mismatch in file 'weights.txt'" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2}).status_code == 200
