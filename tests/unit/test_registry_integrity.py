"""A version's manifest is data read from storage: its file names are checked before any path is built from them."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from rayllm.registry import IntegrityError, Registry, RegistryError

SECRET = random.Random(7).randbytes(512)  # bytes outside the registry that a forged manifest tries to reach


def make_adapter(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(2048))
    (folder / "rayllm_adapter.json").write_text(json.dumps({"rank": 4, "metrics": {"val_loss": 1.0}}))
    return folder


def entry(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def forge(vdir: Path, files: dict) -> None:
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["files"] = {**manifest["files"], **files}
    (vdir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Registry, Path]:
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("s", str(make_adapter(tmp_path / "ad")))
    reg.publish("s", str(make_adapter(tmp_path / "ad2", seed=2)))
    (tmp_path / "secret.bin").write_bytes(SECRET)
    return reg, tmp_path


# Each name is one that publish never writes; '../../../secret.bin' reaches a real file with matching checksum.
@pytest.mark.parametrize("rel, why", [
    ("../../../secret.bin", "climbs out"), ("sub/../../../../secret.bin", "climbs out"), ("/etc/hostname", "absolute path"),
    ("a\\..\\..\\secret.bin", "backslash"), ("a\x00b", "control character"), ("./adapter_config.json", "'.' path component"),
    ("a//b", "empty or '.'"), ("manifest.json", "reserves"), ("", "not a file name"),
])
def test_unsafe_file_names_in_a_manifest_are_refused_before_any_read(setup, rel: str, why: str) -> None:
    reg, tmp = setup
    forge(tmp / "registry" / "s" / "v1", {rel: entry(SECRET)})
    for call in (lambda: reg.resolve("s@v1"), lambda: reg.resolve("s@v1", verify=False),
                 lambda: reg.fetch("s@v1", str(tmp / "out" / "copy")), lambda: reg.localize("s@v1", str(tmp / "cache")),
                 lambda: reg.promote("s:prod", 1), lambda: reg.show("s@v1", verify=True)):
        with pytest.raises(IntegrityError, match=why) as err:
            call()
        assert "s@v1" in str(err.value) and repr(rel) in str(err.value)
    assert not (tmp / "out").exists() and not (tmp / "secret.bin.partial").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["ad", "ad2", "registry", "secret.bin"]  # nothing written beside
    assert reg.resolve("s@v2").version == 2 and reg.get_alias("s:prod") is None  # the other version is untouched
    reg.delete("s@v1")  # a corrupt version can still be removed
    assert reg.versions("s") == [2]


@pytest.mark.parametrize("bad", [{"sha256": "x" * 64, "size": 1}, {"sha256": "0" * 64, "size": -1},
                                 {"sha256": "0" * 64, "size": True}, {"size": 3}, "not an object"])
def test_malformed_file_entries_are_integrity_errors(setup, bad) -> None:
    reg, tmp = setup
    forge(tmp / "registry" / "s" / "v1", {"adapter_config.json": bad})
    with pytest.raises(IntegrityError, match="s@v1: manifest.json entry of file 'adapter_config.json'"):
        reg.resolve("s@v1", verify=False)


def test_manifest_without_files_is_an_integrity_error(setup) -> None:
    reg, tmp = setup
    path = tmp / "registry" / "s" / "v1" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "files": []}))
    with pytest.raises(IntegrityError, match="s@v1: manifest.json has no 'files'"):
        reg.resolve("s@v1", verify=False)


def test_a_symlink_out_of_the_version_folder_is_refused_even_with_matching_bytes(setup) -> None:
    reg, tmp = setup
    weights = tmp / "registry" / "s" / "v1" / "adapter_model.safetensors"
    outside = tmp / "elsewhere.bin"
    outside.write_bytes(weights.read_bytes())  # same bytes: only where they live is wrong
    weights.unlink()
    os.symlink(outside, weights)
    with pytest.raises(IntegrityError, match="s@v1: file 'adapter_model.safetensors' resolves outside the version folder"):
        reg.resolve("s@v1")
    with pytest.raises(IntegrityError, match="resolves outside"):
        reg.localize("s@v1", str(tmp / "cache"))


def test_checksum_and_missing_file_failures_are_integrity_errors(setup) -> None:
    reg, tmp = setup
    vdir = tmp / "registry" / "s" / "v1"
    (vdir / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="checksum mismatch in file 'adapter_model.safetensors'"):
        reg.resolve("s@v1")
    (vdir / "adapter_model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="'adapter_model.safetensors' listed in manifest.json is missing"):
        reg.resolve("s@v1")
    (vdir / "stray.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="'stray.bin' is not in manifest.json"):
        reg.resolve("s@v1")
    with pytest.raises(RegistryError) as err:  # an absent version is a plain RegistryError, not an integrity one
        reg.resolve("s@v9")
    assert not isinstance(err.value, IntegrityError)
