"""The bytes of a version: checksums, verified copies, atomic JSON files and the adapter's metadata.

Files are hashed while they are copied (one read per byte, also on object stores), and the
manifest's facts about the adapter come from the metadata that training writes next to the
PEFT files, so the registry never has to load a model to describe one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from rayllm.registry.names import IntegrityError, RegistryError

CHUNK = 1 << 20
MANIFEST = "manifest.json"  # the registry's own record of a version, next to the adapter files
METADATA_FILE = "rayllm_adapter.json"  # written by training next to the PEFT files
PEFT_CONFIG_FILE = "adapter_config.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_manifest(manifest: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The manifest's `files`, once every name is a safe relative path and every entry a checksum and size.

    Runs before any file name is joined to a folder: a manifest is data read from storage, and a
    name such as `../../x` or `/etc/passwd` would otherwise make verify, fetch or serving read (or a
    fetch write) outside the version folder. Names are what publish writes: POSIX relative paths
    of plain components.
    """
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{where}: manifest.json has no 'files' object; the manifest is malformed")
    for rel, entry in files.items():
        problem = _unsafe_name(rel)
        if problem:
            raise IntegrityError(f"{where}: manifest.json lists file {rel!r}, {problem}; refused before reading anything")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool) and entry["size"] >= 0):
            raise IntegrityError(f"{where}: manifest.json entry of file {rel!r} is not {{sha256: 64 hex digits, size: bytes}}")
    return files


def _unsafe_name(rel: Any) -> str:
    """Why `rel` is not a safe file name inside a version folder ("" when it is)."""
    if not isinstance(rel, str) or not rel:
        return "which is not a file name"
    if rel.startswith("/"):
        return "an absolute path"
    if "\\" in rel:
        return "which contains a backslash"
    if _CONTROL.search(rel):
        return "which contains a control character (NUL, newline, ...)"
    parts = rel.split("/")
    if ".." in parts:
        return "which climbs out of the version folder ('..')"
    if any(p in ("", ".") for p in parts):
        return "which has an empty or '.' path component"
    if rel == MANIFEST:
        return "a name the registry reserves for its own manifest"
    return ""


def inside(folder: str, rel: str, where: str, local: bool) -> str:
    """`folder/rel` for a name `check_manifest` passed; on local disk also after resolving symlinks,
    so a link planted in a version folder cannot point the reader elsewhere."""
    path = f"{folder}/{rel}"
    if local:
        real_folder = os.path.realpath(folder)
        if os.path.commonpath([real_folder, os.path.realpath(path)]) != real_folder:
            raise IntegrityError(f"{where}: file {rel!r} resolves outside the version folder (a symbolic link?); refused")
    return path


def hash_file(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    """sha256 hex digest and size in bytes of one file."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_hashed(src_fs: AbstractFileSystem, src: str, dst_fs: AbstractFileSystem, dst: str) -> tuple[str, int]:
    """Copy one file across filesystems, returning the sha256 and size of the bytes written."""
    digest, size = hashlib.sha256(), 0
    with src_fs.open(src, "rb") as fin, dst_fs.open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    return digest.hexdigest(), size


def check_file(fs: AbstractFileSystem, path: str, rel: str, expected: dict[str, Any], where: str) -> None:
    """Raise a RegistryError naming `rel` if the file is missing or its bytes differ from the manifest."""
    if not fs.exists(path):
        raise IntegrityError(f"{where}: file {rel!r} listed in manifest.json is missing")
    sha, size = hash_file(fs, path)
    if sha != expected["sha256"] or size != expected["size"]:
        raise IntegrityError(
            f"{where}: checksum mismatch in file {rel!r} (expected sha256 {expected['sha256'][:12]}… "
            f"{expected['size']} bytes, found {sha[:12]}… {size} bytes); the stored adapter was modified or corrupted"
        )


def read_json(fs: AbstractFileSystem, path: str, where: str | None = None) -> dict[str, Any] | None:
    """A JSON object from `path`, None when the file does not exist, RegistryError when it is not JSON."""
    try:
        blob = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError:
        # pyarrow's S3 client reads with a HEAD then a GET; a delete between them is a plain OSError
        if not fs.exists(path):
            return None
        raise
    return parse_json_object(blob, where or path)


def parse_json_object(blob: bytes, where: str) -> dict[str, Any]:
    """The JSON object in `blob` (a registry record's bytes); RegistryError naming `where` otherwise."""
    try:
        data = json.loads(blob.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def json_blob(data: dict[str, Any]) -> bytes:
    """How every registry record is written: indented, keys sorted, UTF-8."""
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


def write_json_atomic(fs: AbstractFileSystem, path: str, data: dict[str, Any], local: bool) -> None:
    """Replace `path` in one step: temp file + rename on local disk, a single PUT on object stores.

    Readers of manifests and aliases therefore see the old content or the new, never a torn file.
    """
    blob = json_blob(data)
    if not local:
        fs.pipe_file(path, blob)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def adapter_facts(fs: AbstractFileSystem, adapter_dir: str, metrics: dict[str, Any] | None = None,
                  source_run: str | None = None) -> dict[str, Any]:
    """What the manifest says about an adapter: rayllm metadata first, PEFT's config as the fallback.

    A folder with neither file is refused: without them nobody could tell which base model
    the adapter belongs to, and serving it on the wrong base would produce garbage silently.
    `metrics` (merged over the folder's) and `source_run` come from the publisher.
    """
    if not fs.isdir(adapter_dir):
        raise RegistryError(f"adapter folder {adapter_dir!r} does not exist")
    meta = read_json(fs, f"{adapter_dir}/{METADATA_FILE}")
    peft = read_json(fs, f"{adapter_dir}/{PEFT_CONFIG_FILE}")
    if meta is None and peft is None:
        raise RegistryError(f"{adapter_dir}: neither {METADATA_FILE} nor {PEFT_CONFIG_FILE} found; is this an adapter folder?")
    meta, peft = meta or {}, peft or {}
    target_modules = meta.get("target_modules", peft.get("target_modules"))
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = sorted(target_modules)
    metrics_found = meta.get("metrics") or {}
    if not isinstance(metrics_found, dict):
        raise RegistryError(f"{adapter_dir}/{METADATA_FILE}: 'metrics' must be an object, got {type(metrics_found).__name__}")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise RegistryError(f"metrics must be a dict, got {type(metrics).__name__}")
        metrics = {**metrics_found, **metrics}
    facts = {
        "base_fingerprint": meta.get("base_fingerprint"),
        "base_model": meta.get("base_model", peft.get("base_model_name_or_path")),
        "rank": meta.get("rank", peft.get("r")),
        "target_modules": target_modules,
        "config_hash": meta.get("config_hash"),
        "metrics": metrics_found if metrics is None else metrics,
        "source_run": meta.get("source_run") if source_run is None else source_run,
    }
    try:  # refused here, before a version number is claimed, so bad metadata never leaves a dead claim
        json.dumps(facts)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"metadata of {adapter_dir!r} is not JSON-serialisable ({e})") from e
    return facts


def copy_tree_hashed(src_fs: AbstractFileSystem, src: str, dst_fs: AbstractFileSystem, dst: str,
                     mkdirs: bool) -> dict[str, dict[str, Any]]:
    """Copy every file under `src` to `dst`, returning {relative path: {sha256, size}} for the manifest."""
    rels = sorted(p[len(src) + 1:] for p in src_fs.find(src))
    if not rels:
        raise RegistryError(f"adapter folder {src!r} is empty")
    if MANIFEST in rels:
        raise RegistryError(f"{src}: contains {MANIFEST}, a name the registry reserves for its own manifest")
    files = {}
    for rel in rels:
        if mkdirs:  # local disk needs parent folders; object stores have none
            os.makedirs(os.path.dirname(f"{dst}/{rel}"), exist_ok=True)
        sha, size = copy_hashed(src_fs, f"{src}/{rel}", dst_fs, f"{dst}/{rel}")
        files[rel] = {"sha256": sha, "size": size}
    return files


def copy_to_local(fs: AbstractFileSystem, src_dir: str, manifest: dict[str, Any], dest: str, where: str) -> None:
    """Copy a version's files into local `dest`, checking each against the manifest as it streams.

    The copy lands in a sibling temp folder renamed into place, so a crash or a bad checksum
    never leaves a half-copied folder that looks complete.
    """
    local = fsspec.filesystem("file")
    files = check_manifest(manifest, where)
    tmp = f"{dest}.partial-{uuid.uuid4().hex}"
    try:
        for rel, expected in files.items():
            os.makedirs(os.path.dirname(f"{tmp}/{rel}"), exist_ok=True)
            sha, size = copy_hashed(fs, f"{src_dir}/{rel}", local, f"{tmp}/{rel}")
            if sha != expected["sha256"] or size != expected["size"]:
                raise IntegrityError(f"{where}: checksum mismatch in file {rel!r} while fetching; "
                                    "the stored adapter was modified or corrupted")
        with open(f"{tmp}/{MANIFEST}", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        if local_copy_matches(dest, manifest):
            return  # an identical fetch (another replica sharing the cache folder) finished first: keep its copy
        if os.path.exists(dest):
            shutil.rmtree(dest)  # a stale or different version: replaced, never merged
        try:
            os.rename(tmp, dest)
        except OSError:
            if not local_copy_matches(dest, manifest):  # lost a race to an identical fetch: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_copy_matches(dest: str, manifest: dict[str, Any]) -> bool:
    """True when local `dest` already holds exactly this version, bytes included (local hashing is cheap)."""
    try:
        with open(os.path.join(dest, MANIFEST)) as f:
            if json.load(f) != manifest:
                return False
        local = fsspec.filesystem("file")
        for rel, expected in check_manifest(manifest, dest).items():
            check_file(local, inside(dest, rel, dest, local=True), rel, expected, dest)
        return True
    except (OSError, ValueError, RegistryError):
        return False
