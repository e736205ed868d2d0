"""Which adapters are loaded in one engine: lazy loads, LRU eviction, and unloads that wait.

Every request holds a lease on its adapter for as long as it runs (the whole stream), so an
adapter is only removed from the engine once nothing uses it: evictions pick idle adapters,
unloads and reloads wait for in-flight requests to finish. A folder reloaded under the same name
gets a new entry (new engine id, new path) that becomes active only after the old one drained:
vLLM finds an adapter by name, and its prefix cache keys blocks by name and path, so neither may
ever hand a request the other weights.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rayllm.registry.names import RegistryError
from rayllm.serve.compat import AdapterIncompatible, check_adapter
from rayllm.serve.errors import ServeError
from rayllm.serve.folders import AdapterFolders
from rayllm.serve.protocol import AdapterSpec, Engine

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    spec: AdapterSpec
    lora_id: int
    ready: asyncio.Future
    refs: int = 0
    retired: bool = False
    removed: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    path: str | None = None


class Lease:
    """A request's hold on a loaded adapter; `release()` exactly once (the server does it in `finally`)."""

    def __init__(self, manager: "AdapterManager", entry: _Entry):
        self._manager, self.entry = manager, entry

    @property
    def name(self) -> str:
        return self.entry.spec.name

    def release(self) -> None:
        self._manager._release(self.entry)


class AdapterManager:
    def __init__(self, engine: Engine, *, slots: int, max_rank: int, base_fingerprint: str | None,
                 stage_dir: str, registry_cache_dir: str | None = None, drain_timeout_s: float = 120.0):
        self.engine = engine
        self.slots = slots
        self.max_rank = max_rank
        self.base_fingerprint = base_fingerprint
        self.stage_dir = Path(stage_dir)
        self.folders = AdapterFolders(stage_dir, registry_cache_dir)
        self.drain_timeout_s = drain_timeout_s
        self._entries: dict[tuple, _Entry] = {}  # insertion order = recency (LRU first)
        self._newest: dict[str, int] = {}  # name -> newest generation seen
        self._ids = itertools.count(1)

    # -- requests ---------------------------------------------------------------------------
    async def acquire(self, spec: AdapterSpec) -> Lease:
        """Lease the adapter, loading it first if needed; raises ServeError (e.g. 400 incompatible)."""
        entry = self._entry_for(spec)
        entry.refs += 1
        entry.idle.clear()
        try:
            await asyncio.shield(entry.ready)
        except BaseException:
            self._release(entry)
            raise
        return Lease(self, entry)

    async def load(self, spec: AdapterSpec) -> None:
        (await self.acquire(spec)).release()

    async def unload(self, name: str) -> int:
        """Retire every loaded version of `name`; returns once in-flight requests finished and it is gone."""
        entries = [e for e in self._entries.values() if e.spec.name == name]
        for e in entries:
            e.retired = True
        await asyncio.gather(*(self._remove_when_idle(e) for e in entries))
        return len(entries)

    # -- internals ----------------------------------------------------------------------------
    def _entry_for(self, spec: AdapterSpec) -> _Entry:
        newest = self._newest.get(spec.name, -1)
        if spec.generation < newest:
            # Resolved before a reload of the same name: never bring old weights back, use the new ones.
            current = [e for e in self._entries.values() if e.spec.name == spec.name and e.spec.generation == newest]
            if current and not current[0].retired:
                return current[0]
        entry = self._entries.get(spec.key)
        if entry is not None and not entry.retired:
            self._entries[spec.key] = self._entries.pop(spec.key)  # most recently used
            return entry
        self._newest[spec.name] = max(newest, spec.generation)
        entry = _Entry(spec, next(self._ids), asyncio.get_running_loop().create_future())
        entry.ready.add_done_callback(lambda f: f.exception())  # failure is reported to waiters, not logged as lost
        self._entries[spec.key] = entry
        asyncio.get_running_loop().create_task(self._load(entry))
        return entry

    async def _load(self, entry: _Entry) -> None:
        spec = entry.spec
        try:
            older = [e for e in self._entries.values() if e.spec.name == spec.name and e is not entry]
            for e in older:
                e.retired = True
            if older:  # vLLM looks adapters up by name: the old weights drain before the new take the name
                drains = [asyncio.ensure_future(self._remove_when_idle(e)) for e in older]
                _, pending = await asyncio.wait(drains, timeout=self.drain_timeout_s)
                if pending:  # a stuck client must not block the new version forever; old goes on release
                    logger.warning("adapter %s: old version still busy after %.0fs, loading the new one anyway",
                                   spec.name, self.drain_timeout_s)
            t0 = time.perf_counter()
            if self.folders.blocks(spec):
                local = await asyncio.to_thread(self.folders.local, spec)
            else:  # a plain local folder is one stat: a thread hop would cost more than it saves
                local = self.folders.local(spec)
            check_adapter(local, self.base_fingerprint, self.max_rank)
            await self._make_room()
            entry.path = self._stage(local, spec.name, entry.lora_id)
            t1 = time.perf_counter()
            await self.engine.add_lora(spec.name, entry.lora_id, entry.path)
            entry.ready.set_result(None)
            t2 = time.perf_counter()
            logger.info("loaded adapter %s (lora id %d) from %s: files %.1f ms, engine %.1f ms", spec.name, entry.lora_id,
                        spec.source, 1000 * (t1 - t0), 1000 * (t2 - t1))
        except AdapterIncompatible as e:
            self._fail(entry, ServeError(400, f"adapter '{spec.name}' cannot be served on this base model: {e}", "model"))
        except ServeError as e:
            self._fail(entry, e)
        except RegistryError as e:  # the version exists (the catalog found it) but its stored files fail their check
            logger.error("adapter %s refused: %s", spec.name, e)
            reason = str(e) if "/" not in str(e) else "its stored files could not be read"  # no storage paths to callers
            self._fail(entry, ServeError(502, f"adapter '{spec.name}' failed its integrity check in the registry and is "
                                              f"not served ({reason}); other adapters are unaffected", "model"))
        except OSError as e:  # storage unreachable or failing: the caller may retry
            logger.error("adapter %s: reading its files failed: %s", spec.name, e)
            self._fail(entry, ServeError(503, f"adapter '{spec.name}' could not be read from storage; retry later",
                                         "model", retry_after_s=1.0))
        except Exception as e:  # noqa: BLE001 - a broken adapter must not take the server down
            logger.exception("loading adapter %s failed", spec.name)
            self._fail(entry, ServeError(400, f"adapter '{spec.name}' failed to load: {e}", "model"))

    def _fail(self, entry: _Entry, err: ServeError) -> None:
        if self._entries.get(entry.spec.key) is entry:
            del self._entries[entry.spec.key]
        entry.removed = True
        if not entry.ready.done():
            entry.ready.set_exception(err)

    def _stage(self, local: str, name: str, lora_id: int) -> str:
        """A path unique to this load: vLLM keys cached prefix blocks by adapter name *and* path."""
        link = self.stage_dir / "active" / f"{name.replace('@', '_')}.{lora_id}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(local).resolve(), target_is_directory=True)
        return str(link)

    def _loaded(self) -> list[_Entry]:
        """Entries holding a slot: loaded and not on their way out (retired ones only drain)."""
        return [e for e in self._entries.values() if e.ready.done() and not e.removed and not e.retired]

    async def _make_room(self) -> None:
        """Evict idle adapters, least recently used first, until one more fits in `slots`."""
        excess = len(self._loaded()) + 1 - self.slots
        for e in self._loaded():  # dict order: least recently used first
            if excess <= 0:
                break
            if e.refs == 0:
                e.retired = True
                await self._remove(e)
                excess -= 1
        # Every slot busy: load anyway (over by one for a while); a later release evicts.

    def _release(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs > 0:
            return
        entry.idle.set()
        loop = asyncio.get_running_loop()
        if entry.retired and entry.ready.done() and not entry.removed:
            loop.create_task(self._remove(entry))
        elif len(self._loaded()) > self.slots:
            victim = next((e for e in self._loaded() if e.refs == 0), None)
            if victim is not None:
                victim.retired = True
                loop.create_task(self._remove(victim))

    async def _remove_when_idle(self, entry: _Entry) -> None:
        if not entry.ready.done():
            await asyncio.wait([entry.ready])
        while entry.refs > 0:
            entry.idle.clear()
            await entry.idle.wait()
        await self._remove(entry)

    async def _remove(self, entry: _Entry) -> None:
        if entry.removed:
            return
        entry.removed = True
        if self._entries.get(entry.spec.key) is entry:
            del self._entries[entry.spec.key]
        if entry.ready.done() and entry.ready.exception() is None:
            try:
                await self.engine.remove_lora(entry.spec.name, entry.lora_id)
            except Exception:  # noqa: BLE001 - the engine keeps a bounded cache of its own; log and go on
                logger.exception("removing adapter %s (lora id %d) failed", entry.spec.name, entry.lora_id)
            if entry.path and Path(entry.path).is_symlink():
                Path(entry.path).unlink()
            logger.info("removed adapter %s (lora id %d)", entry.spec.name, entry.lora_id)
