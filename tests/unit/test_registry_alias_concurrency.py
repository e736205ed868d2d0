"""Alias writes under concurrent writers: processes promoting, rolling back and deleting at once lose no
history entry and never leave an alias on a deleted version (local disk here; S3 in test_registry_s3.py)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

from rayllm.registry import Registry, RegistryError

VERSIONS = 8
DOOMED = (5, 6, 7, 8)  # what the deleters try to delete while the promoters try to move the alias onto them
HISTORY_MAX = 100  # resolve.HISTORY_LIMIT: the workload stays below it, so every entry must still be there


def make_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(1024))
    return folder


def writer(root: str, options: dict[str, Any], role: str, i: int, start: float, ops: int, out: Any) -> None:
    """One process: promotes (single targets and splits) and rollbacks, or deletes; each outcome is reported."""
    reg, rng, results = Registry(root, **options), random.Random(i), []
    while time.time() < start:  # line the processes up so their writes really collide
        time.sleep(0.002)
    for k in range(ops):
        tag = f"w{i}-{k}"
        try:
            if role == "delete":
                v = DOOMED[k % len(DOOMED)]
                reg.delete(f"s@v{v}")
                results.append(("delete", tag, v, True))
            elif rng.random() < 0.25:
                reg.rollback("s:prod", by=tag)
                results.append(("rollback", tag, None, True))
            else:
                a, b = rng.sample(range(1, VERSIONS + 1), 2)
                reg.promote("s:prod", a if rng.random() < 0.6 else {a: 70, b: 30}, note={"by": tag})
                results.append(("promote", tag, a, True))
        except RegistryError as e:  # refused (version gone or aliased, nothing to roll back to): also an outcome
            results.append((role, tag, str(e), False))
        except Exception as e:  # noqa: BLE001 - anything else is a bug: reported, not a dead process
            results.append(("crash", tag, f"{type(e).__name__}: {e}", False))
        time.sleep(rng.uniform(0, 0.004) if role == "delete" else 0)
    out.put(results)


def tags_in(value: Any) -> set[str]:
    """Every `by` found anywhere in an alias file: current note, history notes, rolled-back and restored notes."""
    if isinstance(value, dict):
        return ({value["by"]} if isinstance(value.get("by"), str) else set()) | {t for v in value.values() for t in tags_in(v)}
    if isinstance(value, list):
        return {t for v in value for t in tags_in(v)}
    return set()


def run_writers(root: str, options: dict[str, Any], promoters: int, deleters: int, ops: int) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as separate CLI invocations would be
    out = ctx.Queue()
    start = time.time() + 2.0
    roles = ["promote"] * promoters + ["delete"] * deleters
    procs = [ctx.Process(target=writer, args=(root, options, role, i, start, ops, out)) for i, role in enumerate(roles)]
    [p.start() for p in procs]
    results = [r for _ in procs for r in out.get(timeout=90)]
    [p.join(timeout=30) for p in procs]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def check_outcome(reg: Registry, results: list[tuple], min_promotes: int) -> None:
    """What must hold after any interleaving."""
    assert not [r for r in results if r[0] == "crash"], [r for r in results if r[0] == "crash"]
    ok = [r for r in results if r[3]]
    assert sum(r[0] == "promote" for r in ok) >= min_promotes, results  # the writers really wrote
    final = json.loads(reg.fs.cat_file(f"{reg.root}/s/_aliases/prod.json"))
    alias = reg.get_alias("s:prod")
    committed = set(reg.versions("s"))
    assert {t.version for t in alias.targets} <= committed  # never an alias on a deleted version
    deleted = {r[2] for r in ok if r[0] == "delete"}
    assert not deleted & committed and len(deleted) == sum(r[0] == "delete" for r in ok)
    for r in (r for r in results if r[0] == "delete" and not r[3]):  # a refused delete names why
        assert "is the target of alias s:prod" in r[2] or "does not exist" in r[2], r
    missing = {r[1] for r in ok if r[0] != "delete"} - tags_in(final)
    assert not missing, f"lost alias updates: {sorted(missing)}"
    assert len(final["history"]) < HISTORY_MAX
    assert not reg.fs.glob(f"{reg.root}/s/*.deleting.*")  # no delete left its mark behind


def test_processes_promote_rollback_and_delete_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    reg = Registry(root)
    for v in range(1, VERSIONS + 1):
        reg.publish("s", str(make_adapter(tmp_path / f"ad{v}", seed=v)))
    reg.promote("s:prod", 1, note={"by": "setup"})
    results = run_writers(root, {}, promoters=4, deleters=2, ops=12)
    check_outcome(reg, results, min_promotes=10)
    assert (tmp_path / "registry" / ".lock").is_file()  # the writers serialised on the root's lock file


def test_rollback_records_what_it_left_and_what_it_restored(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for v in (1, 2, 3):
        reg.publish("s", str(make_adapter(tmp_path / f"ad{v}", seed=v)))
    reg.promote("s:prod", 1, note={"by": "first", "gate": "skipped"})
    reg.promote("s:prod", 2, note={"by": "second", "gate": "passed"})
    reg.promote("s:prod", 3, note={"by": "third", "gate": "passed"})
    assert reg.rollback("s:prod", by="ops").targets[0].version == 2
    info = reg.show("s:prod")
    assert info["note"]["by"] == "ops"
    assert info["note"]["rolled_back"]["targets"] == [{"version": 3, "weight": 1.0}]
    assert info["note"]["rolled_back"]["note"]["by"] == "third" and info["note"]["restored_note"]["by"] == "second"
    assert [e["note"]["by"] for e in info["history"]] == ["first"]  # one step back: a second rollback reaches v1
    reg.promote("s:prod", 3, note={"by": "fourth"})  # the rollback's note moves into the history with its targets
    assert reg.show("s:prod")["history"][-1]["note"]["by"] == "ops"
    assert tags_in(json.loads((tmp_path / "registry" / "s" / "_aliases" / "prod.json").read_text())) == {
        "first", "second", "third", "ops", "fourth"}


def test_a_promote_onto_a_version_being_deleted_is_refused(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for v in (1, 2):
        reg.publish("s", str(make_adapter(tmp_path / f"ad{v}", seed=v)))
    (tmp_path / "registry" / "s" / "v2.deleting.0123").write_text("{}")  # a delete between its mark and its removal
    try:
        reg.promote("s:prod", 2)
    except RegistryError as e:
        assert "s@v2 is being deleted" in str(e)
    else:
        raise AssertionError("promote onto a version being deleted went through")
    assert reg.get_alias("s:prod") is None


def test_registry_show_prints_a_rollback_note(tmp_path: Path, capsys) -> None:
    from rayllm.registry import cli

    root = tmp_path / "registry"
    reg = Registry(str(root))
    for v in (1, 2):
        reg.publish("s", str(make_adapter(tmp_path / f"ad{v}", seed=v)))
    reg.promote("s:prod", 1)
    reg.promote("s:prod", 2)
    parser = argparse.ArgumentParser(prog="rayllm registry")
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--root", str(root), "rollback", "s:prod"]), None) == 0
    assert cli.run(parser.parse_args(["--root", str(root), "show", "s:prod"]), None) == 0
    assert "rolled back from v2=1 (registry rollback)" in capsys.readouterr().out
