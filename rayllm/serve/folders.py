"""Where an adapter's files are on this replica's disk: the one path from an AdapterSpec to the folder vLLM loads.

    registry version  `Registry.localize`: on a local root the version folder itself, its checksums
                      verified; on a remote root a verified copy in the registry cache folder
    s3:// folder      downloaded once per (URL, generation) into stage_dir/downloaded
    local folder      used as it is

A registry version is verified once per replica and remembered: versions are immutable, so a
reload after an LRU eviction (or the next request) does not hash the files again.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rayllm.registry.names import RegistryError
from rayllm.serve.errors import ServeError
from rayllm.serve.protocol import AdapterSpec
from rayllm.storage import is_uri, url_to_fs


REFUSED_RETRY_S = 10.0  # a repaired version is served again this soon
REFUSED_MAX = 1024


def check_lora_path(path: str, roots: tuple[str, ...] | list[str]) -> str:
    """The load route's `lora_path` if it lies under one of `serve.lora_roots`, else a ServeError:
    400 for a relative path, a `..` or a scheme no root has, 403 for a place outside every root.

    Local paths are compared after resolving symlinks, so a link inside a root cannot lead out.
    """
    if "://" in path:
        scheme, netloc, rest = urlsplit(path)[:3]
        if ".." in rest.split("/"):
            raise ServeError(400, "lora_path must not contain '..'", "lora_path")
        prefixes = [r for r in roots if "://" in r]
        if scheme not in {urlsplit(r).scheme for r in prefixes}:
            raise ServeError(400, f"lora_path scheme {scheme!r} is not allowed here (serve.lora_roots)", "lora_path")
        target = f"{scheme}://{netloc}{posixpath.normpath('/' + rest.lstrip('/'))}"
        if any(target == r.rstrip("/") or target.startswith(r.rstrip("/") + "/") for r in prefixes):
            return path
    else:
        if not os.path.isabs(path):
            raise ServeError(400, "lora_path must be an absolute folder or a URL", "lora_path")
        real = os.path.realpath(path)
        for root in (r for r in roots if "://" not in r):
            base = os.path.realpath(root)
            if os.path.commonpath([base, real]) == base:
                return path
    raise ServeError(403, "lora_path is outside the folders this server loads adapters from (serve.lora_roots)", "lora_path")


class AdapterFolders:
    def __init__(self, stage_dir: str | Path, registry_cache_dir: str | Path | None = None):
        self.stage_dir = Path(stage_dir)
        # Remote registry versions land here (registry.cache_dir); shared by the replicas of a
        # node, since a copy is checked against its manifest before it is reused.
        self.registry_cache_dir = Path(registry_cache_dir) if registry_cache_dir else self.stage_dir / "registry"
        self._registries: dict[str, Any] = {}
        self._verified: dict[str, str] = {}  # "name@vN" -> local folder whose checksums matched
        # "name@vN" -> (until, error): a version that failed its check is not hashed again on every request
        self._refused: dict[str, tuple[float, RegistryError]] = {}
        self._lock = threading.Lock()

    def blocks(self, spec: AdapterSpec) -> bool:
        """Whether `local(spec)` may hash or download (else it is a stat, fine on the event loop)."""
        return spec.registry_root is not None or is_uri(spec.source)

    def local(self, spec: AdapterSpec) -> str:
        """A local folder with the adapter's files; raises ServeError(404) for a folder that is gone.

        Blocking (hashing, downloads): call it off the event loop.
        """
        if spec.registry_root is not None:
            return self._registry_version(spec)
        if is_uri(spec.source):
            return self._download(spec)
        if not Path(spec.source).is_dir():
            raise ServeError(404, f"adapter '{spec.name}': folder {spec.source} does not exist", "model")
        return spec.source

    def _registry_version(self, spec: AdapterSpec) -> str:
        known = self._verified.get(spec.name)
        if known is not None and os.path.isdir(known):
            return known
        refused = self._refused.get(spec.name)
        if refused is not None and refused[0] > time.monotonic():
            raise type(refused[1])(str(refused[1]))
        try:
            found = self._registry(spec.registry_root).localize(spec.name, str(self.registry_cache_dir))
        except RegistryError as e:
            if len(self._refused) >= REFUSED_MAX:
                self._refused.clear()
            self._refused[spec.name] = (time.monotonic() + REFUSED_RETRY_S, e)
            raise
        self._verified[spec.name] = found.path
        return found.path

    def _registry(self, root: str) -> Any:
        from rayllm.registry.store import Registry

        with self._lock:
            if root not in self._registries:
                self._registries[root] = Registry(root)
            return self._registries[root]

    def _download(self, spec: AdapterSpec) -> str:
        # Keyed by generation too: a folder reloaded under the same URL may hold new weights.
        digest = hashlib.sha256(f"{spec.source}#{spec.generation}".encode()).hexdigest()[:16]
        dest = self.stage_dir / "downloaded" / digest
        if not dest.is_dir():
            fs, path = url_to_fs(spec.source)
            tmp = f"{dest}.partial"
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
            os.replace(tmp, dest)
        return str(dest)
