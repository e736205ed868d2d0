"""Adapters loaded through the admin routes reach every ingress replica and survive a restart.

Each "replica" here is the real HTTP layer and catalog over a FakeEngine; replicas share only the
record file in serve.state_dir (as they do under Serve), and a fresh instance over the same file is
a restarted replica. Two ingress replicas in front of one LLM replica share its core.
"""

from __future__ import annotations

import json
import shutil
import threading

from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import FakeEngine, make_adapter_dir, make_frontend

from rayllm.config import parse_config
from rayllm.serve.adapters import AdapterCatalog
from rayllm.serve.auth import Keys
from rayllm.serve.errors import ServeError
from rayllm.serve.openai_routes import build_app
from rayllm.serve.protocol import AdapterSpec
from rayllm.serve.runtime_adapters import RuntimeAdapter, RuntimeAdapters

ADMIN = {"authorization": "Bearer admin-key"}
TENANTS = {
    "acme": {"keys": ["k-acme"], "adapters": ["acme-tool"], "admin_key": "k-acme-admin"},
    "globex": {"keys": ["k-globex"], "adapters": ["other"], "admin_key": "k-globex-admin"},
}


def replica(tmp_path, name: str, record, folders=None, keys=None, engine=None, lora_roots=None, shares=None):
    """One ingress replica (and its LLM replica, or `shares`'s) reading the record file `record`."""
    roots = (str(tmp_path),) if lora_roots is None else tuple(lora_roots)
    front = make_frontend(tmp_path / name, engine=engine or FakeEngine(), keys=keys or Keys(admin="admin-key"),
                          folders=folders, lora_roots=roots)
    front.catalog = AdapterCatalog("base", folders, None, refresh_s=0.0, runtime=RuntimeAdapters(record), lora_roots=roots)
    if shares is not None:
        front.backend = shares.backend
    return front, TestClient(build_app(front))


def models(client, headers=ADMIN) -> set[str]:
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def answer(client, model, headers=ADMIN):
    r = client.post("/v1/completions", headers=headers, json={"model": model, "prompt": "x", "max_tokens": 1})
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"]["message"]


def load(client, name, path, headers=ADMIN, **extra):
    return client.post("/v1/load_lora_adapter", headers=headers, json={"lora_name": name, "lora_path": str(path), **extra})


def unload(client, name, headers=ADMIN):
    return client.post("/v1/unload_lora_adapter", headers=headers, json={"lora_name": name})


def test_an_adapter_loaded_through_one_replica_is_listed_served_and_unloaded_on_every_other(tmp_path):
    record = tmp_path / "state" / "rayllm.adapters.json"
    hot = make_adapter_dir(tmp_path / "hot", "hot")
    a_front, a = replica(tmp_path, "a", record)
    _, b = replica(tmp_path, "b", record, shares=a_front)  # a second ingress replica, same LLM replica
    c_engine = FakeEngine()
    _, c = replica(tmp_path, "c", record, engine=c_engine)  # an LLM replica that never saw the load
    assert load(a, "hot", hot).status_code == 200
    for client in (a, b, c):
        assert "hot" in models(client)
        assert answer(client, "hot") == (200, "hot:0")
    assert [e[:2] for e in c_engine.events] == [("add", "hot")]  # loaded on demand by the first request there
    saved = json.loads(record.read_text())["adapters"]["hot"]
    assert (saved["source"], saved["loaded_by"], saved["tenant"]) == (str(hot), "admin", None)
    assert str(tmp_path) not in b.get("/v1/models", headers=ADMIN).text  # names only, no folders

    assert load(b, "hot", hot).status_code == 400  # already loaded through a: replace only with load_inplace
    assert unload(b, "hot").status_code == 200
    for client in (a, b, c):
        assert "hot" not in models(client)
        assert answer(client, "hot")[0] == 404
    assert unload(c, "hot").status_code == 404
    assert load(c, "hot", hot).status_code == 200 and answer(a, "hot") == (200, "hot:0")


def test_a_restarted_replica_relearns_loads_reloads_and_unloads(tmp_path):
    record = tmp_path / "state" / "rayllm.adapters.json"
    configured = {"b": str(make_adapter_dir(tmp_path / "b", "b"))}
    hot = make_adapter_dir(tmp_path / "hot", "v1")
    _, a = replica(tmp_path, "a", record, folders=configured)
    assert load(a, "hot", hot).status_code == 200
    assert unload(a, "b").status_code == 200  # a configured adapter, unloaded at run time

    _, restarted = replica(tmp_path, "a-restarted", record, folders=configured)
    assert models(restarted) == {"base", "hot"}
    assert answer(restarted, "hot") == (200, "v1:0") and answer(restarted, "b")[0] == 404

    shutil.copytree(make_adapter_dir(tmp_path / "v2", "v2"), hot, dirs_exist_ok=True)  # new weights, same folder
    assert load(a, "hot", hot, load_inplace=True).status_code == 200
    assert answer(restarted, "hot") == (200, "v2:0")  # the newer generation, though it held v1 loaded
    assert load(restarted, "b", configured["b"]).status_code == 200
    _, again = replica(tmp_path, "a-again", record, folders=configured)
    assert models(again) == {"base", "hot", "b"} and answer(again, "b") == (200, "b:0")


def test_tenant_loads_keep_their_scope_on_every_replica(tmp_path):
    record = tmp_path / "state" / "rayllm.adapters.json"
    cfg = parse_config({"serve": {"model": "/m", "api_keys": ["k-all"], "admin_key": "admin-key", "tenants": TENANTS}}).serve
    keys = Keys.from_config(cfg.api_keys, cfg.admin_key, env={}, tenants=cfg.tenants)
    tool = make_adapter_dir(tmp_path / "tool", "tool")
    _, a = replica(tmp_path, "a", record, keys=keys)
    _, b = replica(tmp_path, "b", record, keys=keys)
    acme, globex = {"authorization": "Bearer k-acme"}, {"authorization": "Bearer k-globex"}
    assert load(a, "other", tool, headers={"authorization": "Bearer k-acme-admin"}).status_code == 403
    assert load(a, "acme-tool", tool, headers={"authorization": "Bearer k-acme-admin"}).status_code == 200
    saved = json.loads(record.read_text())["adapters"]["acme-tool"]
    assert (saved["loaded_by"], saved["tenant"]) == ("tenant:acme", "acme")
    assert models(b, acme) == {"base", "acme-tool"} and answer(b, "acme-tool", acme) == (200, "tool:0")
    assert models(b, globex) == {"base"}
    assert answer(b, "acme-tool", globex)[0] == answer(b, "no-such", globex)[0] == 404
    assert unload(b, "acme-tool", {"authorization": "Bearer k-globex-admin"}).status_code == 403
    assert unload(b, "acme-tool", {"authorization": "Bearer k-acme-admin"}).status_code == 200
    assert "acme-tool" not in models(a)


def test_a_recorded_folder_outside_this_replicas_lora_roots_is_not_served(tmp_path):
    record = tmp_path / "state" / "rayllm.adapters.json"
    outside = make_adapter_dir(tmp_path / "elsewhere" / "x", "x")
    _, wide = replica(tmp_path, "wide", record)
    assert load(wide, "x", outside).status_code == 200
    _, narrow = replica(tmp_path, "narrow", record, lora_roots=[str(tmp_path / "allowed")])
    assert "x" not in models(narrow) and answer(narrow, "x")[0] == 404


def test_an_unreadable_record_serves_the_configured_adapters_without_a_5xx(tmp_path):
    record = tmp_path / "state" / "rayllm.adapters.json"
    record.parent.mkdir()
    record.write_text("{not json")
    _, a = replica(tmp_path, "a", record, folders={"b": str(make_adapter_dir(tmp_path / "b", "b"))})
    assert models(a) == {"base", "b"} and answer(a, "b") == (200, "b:0") and answer(a, "hot")[0] == 404


def test_concurrent_writers_through_several_records_lose_nothing(tmp_path):
    record = tmp_path / "rayllm.adapters.json"
    writers = [RuntimeAdapters(record) for _ in range(4)]  # each open() is its own flock owner

    def write(i: int):
        for k in range(15):
            writers[i].record(RuntimeAdapter(AdapterSpec(f"w{i}-{k}", "/x", generation=k), "admin", None, 0.0), replace=False)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(RuntimeAdapters(record).current().adapters) == 60
    taken = RuntimeAdapter(AdapterSpec("w0-0", "/y", generation=99), "admin", None, 0.0)
    try:
        writers[1].record(taken, replace=False)  # the name was recorded by another writer since
    except ServeError as e:
        assert e.status == 400
    else:
        raise AssertionError("a second load of a recorded name without load_inplace was accepted")
    older = RuntimeAdapter(AdapterSpec("w0-1", "/old", generation=0), "admin", None, 0.0)
    writers[2].record(older, replace=True)  # an in-place reload that began before the recorded one
    assert RuntimeAdapters(record).current().adapters["w0-1"].spec.generation == 1


def test_each_application_reads_its_own_record_in_state_dir(tmp_path):
    from rayllm.serve.app import catalog_for

    cfg = parse_config({"serve": {"model": "/m", "state_dir": str(tmp_path), "app_name": "chat"}}).serve
    assert catalog_for(cfg, None).runtime.path == tmp_path / "chat.adapters.json"
    assert catalog_for(cfg.model_copy(update={"state_dir": None}), None).runtime.path is None


def test_the_writing_replica_does_not_read_back_what_it_just_wrote(tmp_path, monkeypatch):
    """The first request on an adapter this replica just loaded finds it without re-reading the
    record; a write by another replica is still seen at the next lookup."""
    path = tmp_path / "state" / "app.adapters.json"
    mine, other = RuntimeAdapters(path), RuntimeAdapters(path)
    spec = AdapterSpec("hot", str(tmp_path / "hot"), generation=1)
    mine.record(RuntimeAdapter(spec, "admin", None, 0.0), replace=False)
    reads = []
    real_read = RuntimeAdapters._read
    monkeypatch.setattr(RuntimeAdapters, "_read", lambda self: reads.append(self) or real_read(self))
    assert "hot" in mine.current().adapters
    assert reads == []
    other.record(RuntimeAdapter(AdapterSpec("cold", str(tmp_path / "cold"), generation=2), "admin", None, 0.0), replace=False)
    assert set(mine.current().adapters) == {"hot", "cold"}
