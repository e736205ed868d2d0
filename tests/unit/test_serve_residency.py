"""AdapterManager: lazy load, LRU eviction, leases that make unloads and reloads wait, failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.unit.serve_fake_engine import FakeEngine, make_adapter_dir

from rayllm.serve.errors import ServeError
from rayllm.serve.protocol import AdapterSpec
from rayllm.serve.residency import AdapterManager


def manager(tmp_path: Path, slots: int = 2, engine: FakeEngine | None = None, **kw) -> AdapterManager:
    return AdapterManager(engine or FakeEngine(), slots=slots, max_rank=16, base_fingerprint="sha256:fake-base",
                          stage_dir=str(tmp_path / "stage"), **kw)


def spec(tmp_path: Path, name: str, tag: str | None = None, generation: int = 0, **kw) -> AdapterSpec:
    folder = make_adapter_dir(tmp_path / "src" / f"{name}-{generation}", tag or name, **kw)
    return AdapterSpec(name, str(folder), generation=generation)


def run(coro):
    return asyncio.run(coro)


def test_lazy_load_once_and_lru_eviction(tmp_path):
    async def main():
        m = manager(tmp_path, slots=2)
        a, b, c = (spec(tmp_path, n) for n in "abc")
        await asyncio.gather(*(m.load(a) for _ in range(5)))  # concurrent first requests: one load
        assert [e for e in m.engine.events if e[0] == "add"] == [("add", "a", 1)]
        await m.load(b)
        await m.load(a)  # a is now the most recently used
        await m.load(c)  # full: evicts b, the least recently used idle one
        assert sorted(m.engine.loras) == ["a", "c"]
        assert ("remove", "b", 2) in m.engine.events

    run(main())


def test_eviction_never_takes_an_adapter_in_use(tmp_path):
    async def main():
        m = manager(tmp_path, slots=1)
        a, b = spec(tmp_path, "a"), spec(tmp_path, "b")
        lease = await m.acquire(a)
        await m.load(b)  # a is busy: b loads anyway (over by one), a stays
        assert "a" in m.engine.loras and "b" in m.engine.loras
        lease.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(m.engine.loras) == 1  # back within slots once a request finished

    run(main())


def test_unload_waits_for_in_flight_requests(tmp_path):
    async def main():
        m = manager(tmp_path)
        a = spec(tmp_path, "a")
        lease = await m.acquire(a)
        unload = asyncio.ensure_future(m.unload("a"))
        await asyncio.sleep(0.05)
        assert not unload.done() and "a" in m.engine.loras  # still serving its request
        lease.release()
        assert await asyncio.wait_for(unload, 1) == 1
        assert "a" not in m.engine.loras

    run(main())


def test_reload_same_name_waits_for_old_weights_then_never_serves_them(tmp_path):
    async def main():
        m = manager(tmp_path)
        old, new = spec(tmp_path, "a", "old", generation=1), spec(tmp_path, "a", "new", generation=2)
        old_lease = await m.acquire(old)
        new_acquire = asyncio.ensure_future(m.acquire(new))
        await asyncio.sleep(0.05)
        assert not new_acquire.done()  # vLLM looks adapters up by name: new waits for old to drain
        old_lease.release()
        new_lease = await asyncio.wait_for(new_acquire, 1)
        assert (Path(m.engine.loras["a"][1]) / "weights.txt").read_text() == "new"
        # A request resolved before the reload (older generation) gets the new weights, not the old back.
        stale = await m.acquire(old)
        assert stale.entry is new_lease.entry
        stale.release()
        new_lease.release()
        assert [e[0] for e in m.engine.events] == ["add", "remove", "add"]

    run(main())


def test_each_load_gets_a_unique_engine_id_and_path(tmp_path):
    async def main():
        m = manager(tmp_path)
        await m.load(spec(tmp_path, "a", "v1", generation=1))
        first = m.engine.loras["a"]
        await m.load(spec(tmp_path, "a", "v2", generation=2))
        second = m.engine.loras["a"]
        assert first[0] != second[0] and first[1] != second[1]  # vLLM's prefix cache keys on name + path

    run(main())


def test_incompatible_adapters_are_refused_with_reason(tmp_path):
    async def main():
        m = manager(tmp_path)
        with pytest.raises(ServeError) as e:
            await m.load(spec(tmp_path, "alien", fingerprint="sha256:other"))
        assert e.value.status == 400 and "base fingerprint mismatch" in e.value.message
        with pytest.raises(ServeError) as e:
            await m.load(spec(tmp_path, "wide", rank=64))
        assert e.value.status == 400 and "rank" in e.value.message and "64" in e.value.message
        with pytest.raises(ServeError) as e:
            await m.load(AdapterSpec("ghost", str(tmp_path / "nowhere")))
        assert e.value.status == 404
        assert m.engine.loras == {}

    run(main())


def test_failed_load_leaves_others_and_can_be_retried(tmp_path):
    async def main():
        m = manager(tmp_path)
        await m.load(spec(tmp_path, "good"))
        broken = spec(tmp_path, "broken")
        (Path(broken.source) / "weights.txt").unlink()
        with pytest.raises(ServeError) as e:
            await m.load(broken)
        assert e.value.status == 400 and "failed to load" in e.value.message
        assert "good" in m.engine.loras
        (Path(broken.source) / "weights.txt").write_text("fixed")
        await m.load(broken)  # a failure is not cached
        assert "broken" in m.engine.loras

    run(main())


def test_a_local_folder_loads_without_a_thread_hop(tmp_path, monkeypatch):
    """Hot-load latency: a plain folder is a stat, checked on the event loop; only registry
    versions and s3:// folders (hashing, downloads) go to a thread."""
    async def main():
        m = manager(tmp_path)

        async def no_thread(*a, **k):
            raise AssertionError("a local folder went through asyncio.to_thread")

        monkeypatch.setattr("rayllm.serve.residency.asyncio.to_thread", no_thread)
        await m.load(spec(tmp_path, "a"))
        assert "a" in m.engine.loras
        assert m.folders.blocks(AdapterSpec("r@v1", str(tmp_path), registry_root=str(tmp_path)))
        assert m.folders.blocks(AdapterSpec("s", "s3://bucket/adapters/s"))

    run(main())
