"""The registry on an object store: moto's S3 server on loopback, through s3fs where it is installed
and through pyarrow's S3 client where it is not."""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.timeout(120)

from rayllm.registry import IntegrityError, Registry, RegistryError  # noqa: E402


def make_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(3000))
    (folder / "rayllm_adapter.json").write_text(json.dumps({"rank": 4, "metrics": {"val_loss": 1.0 + seed}}))
    return folder


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    import boto3

    boto3.session.Session().client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                                   **options["client_kwargs"]).create_bucket(Bucket="registry-bucket")
    yield options
    server.stop()


def test_publish_resolve_fetch_and_tamper_on_s3(tmp_path: Path, s3_options: dict[str, Any]) -> None:
    reg = Registry("s3://registry-bucket/one", **s3_options)
    src = make_adapter(tmp_path / "ad", seed=1)
    assert reg.publish("s", str(src)) == "s@v1"
    assert reg.publish("s", str(src)) == "s@v2"
    found = reg.resolve("s")
    assert found.version == 2 and found.path == "s3://registry-bucket/one/s/v2"
    reg.promote("s:prod", {1: 50, 2: 50})
    local = reg.fetch("s:prod", str(tmp_path / "local"), rng=random.Random(0))
    assert (Path(local.path) / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    cached = reg.localize("s:prod", str(tmp_path / "cache"), rng=random.Random(0))
    assert cached.path == str(tmp_path / "cache" / "s" / f"v{cached.version}")
    assert json.loads((Path(cached.path) / "manifest.json").read_text()) == cached.manifest
    with pytest.raises(RegistryError, match="alias s:prod"):
        reg.delete("s@v1")
    reg.promote("s:prod", 2)
    reg.delete("s@v1")
    assert reg.versions("s") == [2]
    with pytest.raises(RegistryError, match="s@v1 does not exist"):  # the earlier target is gone: say so
        reg.rollback("s:prod")
    reg.fs.pipe_file(f"{reg.root}/s/v2/adapter_model.safetensors", b"tampered")
    with pytest.raises(RegistryError, match="checksum mismatch in file 'adapter_model.safetensors'"):
        reg.resolve("s@v2")
    with pytest.raises(RegistryError, match="checksum mismatch in file 'adapter_model.safetensors'"):
        reg.fetch("s@v2", str(tmp_path / "local2"))


def test_concurrent_publishes_on_s3_get_distinct_versions(tmp_path: Path, s3_options: dict[str, Any]) -> None:
    sources = [make_adapter(tmp_path / f"ad{i}", seed=i) for i in range(4)]
    barrier, refs, errors = threading.Barrier(4), [], []

    def publish(i: int) -> None:
        try:
            reg = Registry("s3://registry-bucket/many", **s3_options)
            barrier.wait()
            for _ in range(2):
                refs.append(reg.publish("shared", str(sources[i])))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert not errors, errors
    assert sorted(refs, key=lambda r: int(r.split("@v")[1])) == [f"shared@v{v}" for v in range(1, 9)]
    reg = Registry("s3://registry-bucket/many", **s3_options)
    assert reg.versions("shared") == list(range(1, 9))
    assert {reg.resolve(r).manifest["metrics"]["val_loss"] for r in refs} == {1.0, 2.0, 3.0, 4.0}


def test_version_claim_is_an_exclusive_create_on_s3(s3_options: dict[str, Any]) -> None:
    reg = Registry("s3://registry-bucket/claims", **s3_options)
    with reg.fs.open(f"{reg.root}/c/v1.claim", "xb") as f:
        f.write(b"first")
    with pytest.raises(FileExistsError):
        with reg.fs.open(f"{reg.root}/c/v1.claim", "xb") as f:
            f.write(b"second")
    assert reg.fs.cat_file(f"{reg.root}/c/v1.claim") == b"first"


def test_unsafe_manifest_file_names_are_refused_on_s3(tmp_path: Path, s3_options: dict[str, Any]) -> None:
    """A forged manifest naming a key outside the version (whose bytes match) is refused before any read."""
    import hashlib

    reg = Registry("s3://registry-bucket/forged", **s3_options)
    reg.publish("s", str(make_adapter(tmp_path / "ad", seed=3)))
    secret = b"outside the version folder"
    reg.fs.pipe_file("registry-bucket/forged/secret.bin", secret)
    manifest_path = f"{reg.root}/s/v1/manifest.json"
    manifest = json.loads(reg.fs.cat_file(manifest_path))
    for rel, why in (("../../secret.bin", "climbs out"), ("/registry-bucket/forged/secret.bin", "absolute path"),
                     ("a\\b", "backslash")):
        forged = {**manifest, "files": {**manifest["files"], rel: {"sha256": hashlib.sha256(secret).hexdigest(),
                                                                   "size": len(secret)}}}
        reg.fs.pipe_file(manifest_path, json.dumps(forged).encode())
        for call in (lambda: reg.resolve("s@v1"), lambda: reg.fetch("s@v1", str(tmp_path / "out")),
                     lambda: reg.localize("s@v1", str(tmp_path / "cache"))):
            with pytest.raises(IntegrityError, match=why) as err:
                call()
            assert "s@v1" in str(err.value) and repr(rel) in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.fixture
def atomic_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto checks If-Match / If-None-Match and then stores in two steps, so two conditional PUTs can both
    pass its check; S3 does both at once. The server runs in this process: serialise its handlers."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for method in ("put_object", "delete_object"):
        original = getattr(S3Response, method)

        def atomic(self: Any, _original: Any = original) -> Any:
            with lock:
                return _original(self)

        monkeypatch.setattr(S3Response, method, atomic)


def test_processes_promote_rollback_and_delete_at_once_on_s3(tmp_path: Path, s3_options: dict[str, Any],
                                                          atomic_moto: None) -> None:
    from tests.unit.test_registry_alias_concurrency import VERSIONS, check_outcome, make_adapter as make, run_writers

    root = "s3://registry-bucket/races"
    reg = Registry(root, **s3_options)
    for v in range(1, VERSIONS + 1):
        reg.publish("s", str(make(tmp_path / f"ad{v}", seed=v)))
    reg.promote("s:prod", 1, note={"by": "setup"})
    results = run_writers(root, s3_options, promoters=3, deleters=1, ops=6)
    check_outcome(reg, results, min_promotes=4)
    print(f"outcomes: {collections.Counter((r[0], r[3]) for r in results)}")


def test_alias_write_is_conditional_on_s3_and_a_lost_race_is_retried(s3_options: dict[str, Any], tmp_path: Path) -> None:
    """Another writer moves the alias between this promote's read and its write: the If-Match PUT is
    refused (412), the promote reads again and writes on top, so both promotes stay in the history."""
    reg, other = Registry("s3://registry-bucket/cas", **s3_options), Registry("s3://registry-bucket/cas", **s3_options)
    for v in (1, 2, 3):
        reg.publish("s", str(make_adapter(tmp_path / f"ad{v}", seed=v)))
    reg.promote("s:prod", 1, note={"by": "first"})
    files, sent, reads = reg._alias_files, [], []
    read, put = files.read, files._s3.put_object

    def read_then_race(path: str, where: str) -> Any:
        found = read(path, where)
        reads.append(found[1])
        if len(reads) == 1:  # after our first read, before our write
            other.promote("s:prod", 2, note={"by": "other"})
        return found

    def recording_put(**kw: Any) -> Any:
        sent.append({k: kw[k] for k in ("IfMatch", "IfNoneMatch") if k in kw})
        return put(**kw)

    files.read, files._s3.put_object = read_then_race, recording_put
    reg.promote("s:prod", 3, note={"by": "mine"})
    assert sent[0] == {"IfMatch": reads[0]} and sent[1] == {"IfMatch": reads[1]} and reads[0] != reads[1]
    info = reg.show("s:prod")
    assert info["targets"][0]["version"] == 3 and info["note"]["by"] == "mine"
    assert [e["note"]["by"] for e in info["history"]] == ["first", "other"]
    reg.promote("s:new", 1)  # a first write creates the file only if it is still absent
    assert sent[-1] == {"IfNoneMatch": "*"}
