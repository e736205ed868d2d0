"""Adapter registry under contention: threads and processes publishing one name, readers racing writers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from rayllm.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parents[2]


def make_adapter(folder: Path, seed: int) -> Path:
    """A fake PEFT folder whose weights are unique to `seed`, so each version's origin is traceable."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(20_000))
    (folder / "rayllm_adapter.json").write_text(json.dumps({"rank": 4, "metrics": {"seed": seed}}))
    return folder


def weights_sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def assert_one_version_per_publish(reg: Registry, name: str, sources: dict[int, Path], refs: list[str]) -> None:
    """Every publish got its own number, every version is complete and verified, and holds one source's bytes."""
    assert len(set(refs)) == len(refs) == len(sources) * (len(refs) // len(sources))
    assert sorted(reg.versions(name)) == sorted(int(r.split("@v")[1]) for r in refs)
    expected = {weights_sha(src) for src in sources.values()}
    seen = []
    for ref in refs:
        found = reg.resolve(ref)  # verify=True: re-hashes every file against the manifest
        sha = weights_sha(Path(found.path))
        assert sha == found.manifest["files"]["adapter_model.safetensors"]["sha256"]
        assert sha == weights_sha(sources[found.manifest["metrics"]["seed"]])  # the manifest matches the bytes
        seen.append(sha)
    assert set(seen) == expected


def test_eight_threads_publish_one_name(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    sources = {i: make_adapter(tmp_path / f"ad{i}", seed=i) for i in range(8)}
    barrier, refs, errors = threading.Barrier(8), [], []

    def publish(i: int) -> None:
        try:
            reg_i = Registry(str(tmp_path / "registry"))
            barrier.wait()
            for _ in range(3):
                refs.append(reg_i.publish("shared", str(sources[i])))
        except Exception as e:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert sorted(refs) == sorted(f"shared@v{v}" for v in range(1, 25))
    assert_one_version_per_publish(reg, "shared", sources, refs)


PUBLISHER = textwrap.dedent("""
    import sys, time
    from rayllm.registry import Registry
    root, src, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    reg = Registry(root)
    while time.time() < start:  # line the processes up so their claims really collide
        time.sleep(0.002)
    for _ in range(3):
        print(reg.publish("shared", src), flush=True)
""")


def test_four_processes_publish_one_name(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    sources = {i: make_adapter(tmp_path / f"ad{i}", seed=i) for i in range(4)}
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, root, str(sources[i]), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    refs = [line for out, _ in outs for line in out.split()]
    assert sorted(refs, key=lambda r: int(r.split("@v")[1])) == [f"shared@v{v}" for v in range(1, 13)]
    assert_one_version_per_publish(Registry(root), "shared", sources, refs)


def test_readers_never_see_missing_or_half_written_versions(tmp_path: Path) -> None:
    """One thread moves the alias (and publishes new versions) while four threads resolve."""
    root = str(tmp_path / "registry")
    writer_reg = Registry(root)
    for i in range(2):
        writer_reg.publish("s", str(make_adapter(tmp_path / f"ad{i}", seed=i)))
    writer_reg.promote("s:prod", 1)
    done, errors, seen = threading.Event(), [], {"s:prod": set(), "s": set()}

    def writer() -> None:
        rng = random.Random(0)
        try:
            for step in range(40):
                if step % 8 == 0:  # new versions keep arriving, so "newest" moves under readers too
                    writer_reg.publish("s", str(make_adapter(tmp_path / f"new{step}", seed=100 + step)))
                versions = writer_reg.versions("s")
                a, b = rng.sample(versions, 2)
                writer_reg.promote("s:prod", a if step % 2 else {a: 70, b: 30})
        except Exception as e:
            errors.append(e)
        finally:
            done.set()

    def reader(seed: int) -> None:
        reg, rng, count = Registry(root), random.Random(seed), 0
        try:
            while not done.is_set() or count < 20:
                for ref in ("s:prod", "s"):
                    found = reg.resolve(ref, rng=rng)  # verify=True: raises on any missing or partial file
                    manifest_on_disk = json.loads((Path(found.path) / "manifest.json").read_text())
                    assert manifest_on_disk == found.manifest and set(found.manifest["files"]) == {
                        "adapter_config.json", "adapter_model.safetensors", "rayllm_adapter.json"}
                    seen[ref].add(found.version)
                count += 1
        except (RegistryError, AssertionError, OSError) as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert not errors, errors[:3]
    assert len(seen["s:prod"]) >= 3 and len(seen["s"]) >= 2  # the readers really raced a moving target
