"""Adapters on an object store: a plain PEFT folder at s3://... and a registry on S3 (moto's S3 server
on loopback stands in), served through the real routes and residency over a FakeEngine."""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend


@pytest.fixture
def s3(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # What a deployment sets too: credentials and endpoint from the environment, none in rayllm's config.
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    from rayllm.storage import url_to_fs

    boto3.session.Session().client("s3").create_bucket(Bucket="adapters")
    fs, _ = url_to_fs("s3://adapters")  # s3fs where installed, else pyarrow: what serving itself uses
    yield fs
    server.stop()


@pytest.mark.timeout(120)
def test_folder_and_registry_adapters_on_s3(tmp_path, s3):
    from rayllm.registry.store import Registry

    poet = make_adapter_dir(tmp_path / "poet", "poet-from-s3")
    s3.put(str(poet) + "/", "adapters/folders/poet/", recursive=True)
    registry = Registry("s3://adapters/registry")
    registry.publish("support", str(make_adapter_dir(tmp_path / "support", "support-v1")))
    registry.promote("support:prod", 1)

    front = make_frontend(tmp_path, folders={"poet": "s3://adapters/folders/poet"}, registry_root="s3://adapters/registry")
    from rayllm.serve.openai_routes import build_app

    with TestClient(build_app(front)) as client:
        for model, served, tag in [("poet", "poet", "poet-from-s3"), ("support:prod", "support@v1", "support-v1"),
                                   ("support", "support@v1", "support-v1")]:
            r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == served and r.json()["choices"][0]["text"].startswith(tag + ":")
        cards = {c["id"] for c in client.get("/v1/models").json()["data"]}
        assert {"poet", "support", "support@v1", "support:prod"} <= cards
        r = client.post("/v1/completions", json={"model": "support@v9", "prompt": "x"})
        assert r.status_code == 404


def test_remote_adapters_through_fsspec_memory(tmp_path):
    """The same remote paths on fsspec's in-memory filesystem, which needs no S3 at all: folders are
    downloaded into the stage dir, registry versions fetched (checksums verified) before loading."""
    import fsspec

    from rayllm.registry.store import Registry
    from rayllm.serve.openai_routes import build_app

    mem = fsspec.filesystem("memory")
    poet = make_adapter_dir(tmp_path / "poet", "poet-remote")
    mem.put(str(poet) + "/", "/serve-test/folders/poet/", recursive=True)
    registry = Registry("memory://serve-test/registry")
    registry.publish("support", str(make_adapter_dir(tmp_path / "support", "support-remote")))
    front = make_frontend(tmp_path, folders={"poet": "memory://serve-test/folders/poet"},
                          registry_root="memory://serve-test/registry")
    with TestClient(build_app(front)) as client:
        for model, served, tag in [("poet", "poet", "poet-remote"), ("support", "support@v1", "support-remote")]:
            r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == served and r.json()["choices"][0]["text"].startswith(tag + ":")
    # registry versions are copied the registry's way (Registry.localize: <cache>/name/vN), folders by URL digest
    assert (tmp_path / "stage" / "registry" / "support" / "v1" / "manifest.json").is_file()
    assert len(list((tmp_path / "stage" / "downloaded").iterdir())) == 1
