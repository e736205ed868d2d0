"""Adapters loaded through the admin routes, shared by every ingress replica and kept across restarts.

One JSON file (`<serve.state_dir>/<app_name>.adapters.json`) records what the load and unload
routes changed: each runtime-loaded adapter (name → source, generation, who loaded it, tenant)
and the config adapters (serve.adapters) that were unloaded. Every replica reads it, so
`/v1/models` and `model` resolution agree across replicas, and a restarted replica re-learns the
adapters; the LLM replicas load them on first use like any other adapter.

Why a file and not a named Ray actor: it survives a restart of any replica (an actor owned by a
replica dies with it, and a detached one outlives the application), costs a `stat` per lookup
instead of a Ray call, and needs no Ray in unit tests. Its limit: replicas on several nodes need
`serve.state_dir` on a filesystem they share.

Writers hold an exclusive `flock` on `<file>.lock` around their read-modify-write and replace the
file atomically, so readers never see a torn file and no concurrent load or unload is lost.
Readers re-read when the file's stat changes, and at least every `refresh_s` (a stat can miss
two writes within one timestamp tick that reuse an inode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayllm.serve.errors import ServeError
from rayllm.serve.protocol import AdapterSpec

logger = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class RuntimeAdapter:
    spec: AdapterSpec
    loaded_by: str  # "admin" (the global admin key) or "tenant:<name>"; never a key
    tenant: str | None
    loaded_at: float


@dataclass(frozen=True)
class State:
    adapters: dict[str, RuntimeAdapter]
    unloaded: frozenset[str]  # config adapters removed by the unload route


_EMPTY = State({}, frozenset())


class RuntimeAdapters:
    """The shared record; `path` None keeps it in this process only (one replica, lost on restart)."""

    def __init__(self, path: str | Path | None, refresh_s: float = 1.0):
        self.path = Path(path) if path else None
        self.refresh_s = refresh_s
        self._state = _EMPTY
        self._seen: tuple | None = None
        self._read_at = -float("inf")

    def current(self) -> State:
        """The record as the file holds it now (a stat per call; a read only when it changed)."""
        if self.path is None:
            return self._state
        try:
            seen = _stat_key(self.path)
        except FileNotFoundError:
            seen = None
        if seen != self._seen or time.monotonic() - self._read_at > self.refresh_s:
            self._state, self._seen, self._read_at = self._read(), seen, time.monotonic()
        return self._state

    def record(self, entry: RuntimeAdapter, replace: bool) -> None:
        """Add or replace `entry`; a 400 when the name was taken meanwhile and `replace` is off."""
        with self._writing() as state:
            old = state.adapters.get(entry.spec.name)
            if old is not None and not replace:  # loaded through another replica since this load began
                raise ServeError(400, f"adapter '{entry.spec.name}' is already loaded; set load_inplace: true to replace it",
                                 "lora_name")
            if old is not None and old.spec.generation > entry.spec.generation:
                return  # a concurrent reload that began later is the newest (the engines keep the newest too)
            state.adapters[entry.spec.name] = entry
            state.unloaded.discard(entry.spec.name)

    def remove(self, name: str, configured: bool) -> bool:
        """Forget a runtime-loaded `name`, or mark a `configured` one unloaded; False when neither was served."""
        with self._writing() as state:
            found = state.adapters.pop(name, None) is not None
            if configured and name not in state.unloaded:
                state.unloaded.add(name)
                found = True
            return found

    # -- file ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """The record to change in place, written back (atomically, under the lock) on success."""
        with self._lock():
            state = self._read() if self.path else self._state
            draft = _Draft(dict(state.adapters), set(state.unloaded))
            yield draft
            new = State(draft.adapters, frozenset(draft.unloaded))
            seen = None
            if self.path is not None:
                seen = self._write(new)
            # Under the lock the file is exactly `new`: this replica's next lookup (the first request
            # on an adapter it just loaded) need not read it back.
            self._state, self._seen, self._read_at = new, seen, time.monotonic()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # each open() is its own lock owner: threads exclude each other too
            yield
        finally:
            os.close(fd)

    def _read(self) -> State:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            adapters = {
                name: RuntimeAdapter(AdapterSpec(name, e["source"], generation=int(e["generation"])),
                                     e.get("loaded_by", "admin"), e.get("tenant"), float(e.get("loaded_at", 0)))
                for name, e in data.get("adapters", {}).items()
            }
            return State(adapters, frozenset(data.get("unloaded", [])))
        except FileNotFoundError:
            return _EMPTY
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a broken record must not take serving down
            logger.error("runtime adapter record %s is unreadable (%s); serving the configured adapters only", self.path, e)
            return _EMPTY

    def _write(self, state: State) -> tuple:
        """Replace the file with `state`; returns its stat as `current()` compares it."""
        assert self.path is not None
        data = {"format": FORMAT,
                "adapters": {n: {"source": a.spec.source, "generation": a.spec.generation, "loaded_by": a.loaded_by,
                                 "tenant": a.tenant, "loaded_at": a.loaded_at} for n, a in sorted(state.adapters.items())},
                "unloaded": sorted(state.unloaded)}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)
        return _stat_key(self.path)


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@dataclass
class _Draft:
    adapters: dict[str, RuntimeAdapter]
    unloaded: set[str]
