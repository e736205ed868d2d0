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
import threading
from pathlib import Path
from typing import Any

from rayllm.serve.errors import ServeError
from rayllm.serve.protocol import AdapterSpec
from rayllm.storage import is_uri, url_to_fs


class AdapterFolders:
    def __init__(self, stage_dir: str | Path, registry_cache_dir: str | Path | None = None):
        self.stage_dir = Path(stage_dir)
        # Remote registry versions land here (registry.cache_dir); shared by the replicas of a
        # node, since a copy is checked against its manifest before it is reused.
        self.registry_cache_dir = Path(registry_cache_dir) if registry_cache_dir else self.stage_dir / "registry"
        self._registries: dict[str, Any] = {}
        self._verified: dict[str, str] = {}  # "name@vN" -> local folder whose checksums matched
        self._lock = threading.Lock()

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
        found = self._registry(spec.registry_root).localize(spec.name, str(self.registry_cache_dir))
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
