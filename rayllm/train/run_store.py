"""Where a run lives: a folder on a disk every node mounts, or an object-store URI.

On a local or shared disk the run folder is used directly. On an object store (`train.output_dir:
s3://bucket/runs`) Ray Train persists checkpoints there itself (its storage path), and rank 0
works in a local staging folder whose files — metrics.jsonl, result.json, the loss curve and the
exported adapter or model — are pushed to the run's URI at every checkpoint and at the end, and
pulled back when a run resumes on another node.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from rayllm.storage import is_uri


class RunStore:
    def __init__(self, output_dir: str, run_name: str):
        self.run_name = run_name
        if is_uri(output_dir):
            self.root_uri: str | None = output_dir.rstrip("/")
            self.uri: str | None = f"{self.root_uri}/{run_name}"
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
            self.local = Path(tempfile.gettempdir()) / "rayllm-runs" / digest / run_name
        else:
            self.root_uri = self.uri = None
            self.local = Path(output_dir).expanduser().resolve() / run_name

    @classmethod
    def on_worker(cls, run_dir: str, run_uri: str | None) -> "RunStore":
        """The store a worker rebuilds from its RunSpec's `run_dir` and `run_uri`: the same staging
        folder as the driver computed (the worker's temp folder may be elsewhere)."""
        if not run_uri:
            return cls(str(Path(run_dir).parent), Path(run_dir).name)
        store = cls(*run_uri.rsplit("/", 1))
        store.local = Path(run_dir)
        return store

    @property
    def location(self) -> str:
        """The run's address for users and for the next stage: its URI, or its folder."""
        return self.uri or str(self.local)

    def where(self, name: str) -> str:
        return f"{self.uri}/{name}" if self.uri else str(self.local / name)

    def _fs(self):
        from rayllm.storage import url_to_fs

        return url_to_fs(self.uri)

    def ray_storage(self) -> dict[str, Any]:
        """Ray Train's RunConfig arguments that put the run's checkpoints where the run lives."""
        if self.uri is None:
            return {"name": self.run_name, "storage_path": str(self.local.parent)}
        from rayllm.storage import url_to_fs

        fs, root = url_to_fs(self.root_uri)
        arrow = getattr(fs, "fs", None)  # pyarrow's own filesystem behind fsspec's ArrowFSWrapper
        if arrow is None:
            return {"name": self.run_name, "storage_path": self.root_uri}  # Ray builds its own from the URI
        return {"name": self.run_name, "storage_path": root, "storage_filesystem": arrow}

    def read_json(self, name: str) -> dict | None:
        if self.uri is None:
            path = self.local / name
            return json.loads(path.read_text()) if path.is_file() else None
        fs, root = self._fs()
        try:
            return json.loads(fs.cat_file(f"{root}/{name}"))
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / name).write_text(text)
        self.push(name)

    def push(self, *names: str) -> None:
        """Upload these files or folders of the staging folder to the run's URI (no-op on a disk)."""
        if self.uri is None:
            return
        fs, root = self._fs()
        for name in names:
            src = self.local / name
            files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src] if src.is_file() else []
            for f in files:  # file by file: fsspec's recursive put nests differently when the target exists
                fs.put_file(str(f), f"{root}/{f.relative_to(self.local).as_posix()}")

    def start_fresh(self) -> None:
        """Empty the staging folder of an object-store run starting from step 0: a folder left by an
        earlier run under the same URI must not leak into this one (no-op on a disk)."""
        if self.uri is not None and self.local.is_dir():
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)

    def pull(self, *names: str) -> None:
        """Download these files from the run's URI into the staging folder, where they exist."""
        if self.uri is None:
            return
        fs, root = self._fs()
        self.local.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                fs.get_file(f"{root}/{name}", str(self.local / name))
            except FileNotFoundError:
                pass
