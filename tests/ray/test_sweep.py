"""A real Ray Tune + ASHA sweep over the Ray Train + DeepSpeed trainer, with publish and resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rayllm.config import parse_config
from tests.ray.train_fixtures import make_dataset, tiny_config  # noqa: F401

pytestmark = [pytest.mark.slow]


def _base_model(tmp_path, dataset):
    from rayllm.config import ModelConfig
    from rayllm.model import build_model, load_tokenizer

    tok = load_tokenizer(dataset / "tokenizer")
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128), tok, "float32", seed=0)
    out = tmp_path / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.timeout(900)
def test_sweep_asha_publish_promote_and_resume(ray_local, tmp_path):
    from rayllm.registry import Registry
    from rayllm.tune.sweep import run

    dataset = make_dataset(tmp_path / "data", seq_len=32, n_docs=200, val_docs=60)
    raw = tiny_config(dataset, tmp_path / "unused", max_steps=12, eval_every=3, save_every=6, eval_batches=1,
                      warmup_steps=0, logging_steps=3, learning_rate=1e-3)
    raw["model"] = {"path": str(_base_model(tmp_path, dataset)), "dtype": "float32", "lora": {"rank": 4, "alpha": 16}}
    raw["tune"] = {"learning_rate": {"type": "grid", "values": [2e-2, 1e-6, 3e-3]}, "grace_period": 3, "reduction_factor": 2,
                   "max_concurrent_trials": 1, "output_dir": str(tmp_path / "sweeps"), "name": "lr",
                   "publish_as": "tiny", "promote_alias": "prod", "promote_skip_gate": True, "evaluate": True}
    raw["registry"] = {"path": str(tmp_path / "registry")}
    # every finished trial evaluated by `rayllm eval` beside the base, on the rows the trainer's val_ppl covers
    raw["eval"] = {"targets": [{"path": raw["model"]["path"], "label": "base"}], "dataset": str(dataset), "max_sequences": 8}
    cfg = parse_config(raw)

    trials = tmp_path / "sweeps" / "lr" / "trials"
    summary = run(cfg)
    rows = list(csv.DictReader((tmp_path / "sweeps" / "lr" / "results.csv").open()))
    assert len(rows) == 3 and summary["trials"] == 3
    by_lr = {float(r["learning_rate"]): r for r in rows}
    assert by_lr[1e-6]["stopped_early"] == "True" and int(by_lr[1e-6]["steps"]) < 12  # ASHA stopped the weak trial
    finished = [r for r in rows if r["status"] == "finished"]
    best = min(finished, key=lambda r: float(r["best_val_loss"]))
    assert summary["best"] == best["trial"]
    assert (tmp_path / "sweeps" / "lr" / "val_loss.png").stat().st_size > 1000
    for r in finished:  # the eval stage's perplexity of the exported adapter is the trainer's last val_ppl
        assert float(r["eval_ppl"]) == pytest.approx(float(r["perplexity"]), rel=1e-3), r
    assert all(r["eval_ppl"] == "" for r in rows if r["status"] != "finished")

    reg = Registry(str(tmp_path / "registry"))
    assert summary["published"] == "tiny@v1" and summary["promoted"] is True
    resolved = reg.resolve("tiny:prod")
    # val_loss is the exported (final) weights' figure, the one the promotion gate checks; the best on the way is kept too
    assert resolved.version == 1 and resolved.manifest["metrics"]["val_loss"] == pytest.approx(float(best["final_val_loss"]))
    assert resolved.manifest["metrics"]["best_val_loss"] == pytest.approx(float(best["best_val_loss"]))
    assert resolved.manifest["metrics"]["val_sequences"] == 8  # eval_batches 1 × micro 4 × 2 workers
    assert reg.show("tiny:prod")["note"]["gate"] == "skipped"  # the explicit skip is on record
    assert resolved.manifest["eval"]["sweep-lr"]["metrics"]["ppl"] == pytest.approx(float(best["eval_ppl"]))
    assert resolved.manifest["rank"] == 4

    # The same command again restores the finished sweep: nothing is trained or published twice.
    mtimes = {p: p.stat().st_mtime for p in trials.glob("*/result.json")}
    again = run(cfg)
    assert {p: p.stat().st_mtime for p in trials.glob("*/result.json")} == mtimes
    assert again["published"] == "tiny@v1" and again["best"] == summary["best"]
    assert reg.versions("tiny") == [1]


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl as written so far (a line being written may be incomplete)."""
    out = []
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run: what a resumed run restores (a checkpoint
    a worker saved but the controller had not yet recorded is lost with the driver)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return False
    return bool(snapshot.get("checkpoint_results"))


def _wait_mid_sweep(trials: Path, driver: subprocess.Popen, timeout: float) -> tuple[Path, Path]:
    """Wait until one trial has finished and the next is training with a registered checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, f"the sweep ended (exit {driver.returncode}) before it could be interrupted"
        runs = [d for d in trials.glob("*") if d.is_dir()] if trials.exists() else []
        done = [d for d in runs if (d / "result.json").exists()]
        going = [d for d in runs if d not in done and _has_checkpoint(d)]
        if done and going:
            return done[0], going[0]
        time.sleep(0.2)
    raise AssertionError(f"no trial reached a checkpoint after a finished one within {timeout} s")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started, at once: its descendants (Ray's workers, which
    the raylet may start in sessions of their own) and its process group; then wait until none is left."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for _ in range(60):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        proc.poll()  # reap the driver: a zombie still counts as a member of the group
        time.sleep(0.5)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


@pytest.mark.timeout(900)
def test_sweep_killed_mid_way_resumes_and_runs_every_grid_point_once(ray_local, tmp_path):
    """`rayllm sweep` is SIGKILLed while its second trial trains; running it again finishes the grid."""
    from rayllm.registry import Registry
    from rayllm.tune.sweep import run

    dataset = make_dataset(tmp_path / "data", seq_len=32, n_docs=200, val_docs=60)
    # Enough steps after the first checkpoint that the kill lands mid-run: 2 micro-batches per step make
    # a step ~60 ms, so the 60 left (~4 s) outlast the checkpoint's registration and the kill.
    raw = tiny_config(dataset, tmp_path / "unused", max_steps=80, eval_every=20, save_every=20, eval_batches=1,
                      warmup_steps=0, logging_steps=1, gradient_accumulation_steps=2)
    raw["model"] = {"path": str(_base_model(tmp_path, dataset)), "dtype": "float32", "lora": {"rank": 4, "alpha": 16}}
    raw["tune"] = {"learning_rate": {"type": "grid", "values": [3e-3, 1e-2, 2e-2]}, "grace_period": 80,
                   "max_concurrent_trials": 1, "output_dir": str(tmp_path / "sweeps"), "name": "lr",
                   "publish_as": "tiny", "promote_alias": "prod", "promote_skip_gate": True}
    raw["registry"] = {"path": str(tmp_path / "registry")}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweeps" / "lr"

    # The driver starts its own local Ray (not this module's), all in one new process group.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with (tmp_path / "killed_sweep.log").open("w") as log:
        driver = subprocess.Popen([sys.executable, "-u", "-m", "rayllm.cli", "sweep", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2], start_new_session=True)
        try:
            first, second = _wait_mid_sweep(out / "trials", driver, timeout=400)
        finally:
            _kill_group(driver)
    assert not (second / "result.json").exists()
    assert len([d for d in (out / "trials").glob("*") if d.is_dir()]) == 2  # the third grid point never started
    first_done = (first / "result.json").stat().st_mtime

    summary = run(parse_config(raw))  # the same command again (on this module's Ray)

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(float(r["learning_rate"]) for r in rows) == [3e-3, 1e-2, 2e-2]  # each grid point exactly once
    assert len({r["trial"] for r in rows}) == 3 and {first.name, second.name} <= {r["trial"] for r in rows}
    assert all(r["status"] == "finished" and int(r["steps"]) == 80 for r in rows), rows
    assert (first / "result.json").stat().st_mtime == first_done  # the finished trial was not trained again
    starts = [r for r in _records(second) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] in (20, 40, 60)  # from its own checkpoint

    reg = Registry(str(tmp_path / "registry"))
    assert summary["trials"] == 3 and summary["published"] == "tiny@v1" and summary["promoted"] is True
    assert reg.versions("tiny") == [1] and reg.resolve("tiny:prod").version == 1
    assert reg.resolve("tiny:prod").manifest["source_run"] == summary["best"]
