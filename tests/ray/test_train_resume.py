"""Exact resume: a run stopped and rerun matches a straight run step for step; a killed worker process
restarts the group from the last checkpoint and the run finishes by itself."""

import json
import signal
import threading
import time

import pytest
from tests.ray.train_fixtures import read_metrics, tiny_config, tiny_dataset, train  # noqa: F401

pytestmark = pytest.mark.slow


def trace(run_dir):
    """step → (loss, crc of the step's sample indices), the last record of each step winning."""
    return {m["step"]: (m["loss"], m["batch_crc"]) for m in read_metrics(run_dir) if "batch_crc" in m}


@pytest.mark.timeout(300)
def test_stop_and_rerun_matches_a_straight_run(ray_local, tiny_dataset, tmp_path):
    common = dict(gradient_accumulation_steps=2, max_steps=12, save_every=6, eval_every=6, ingest="ray_data")
    straight = train(tiny_config(tiny_dataset, tmp_path, run_name="straight", **common))
    first = train(tiny_config(tiny_dataset, tmp_path, run_name="split", stop_at_step=6, **common))
    assert first["status"] == "stopped" and first["step"] == 6
    second = train(tiny_config(tiny_dataset, tmp_path, run_name="split", **common))  # the same command again
    starts = [m for m in read_metrics(tmp_path / "split") if m.get("event") == "start"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (6, True)]
    a, b = trace(tmp_path / "straight"), trace(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step][1] == a[step][1], f"step {step} trained on other data"
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-6, abs=1e-7), f"step {step} loss differs"
    assert second["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)


def _kill_one_worker_after_first_checkpoint(run_dir, killed: list, stop: threading.Event):
    """SIGKILL one Ray Train worker of this test's own Ray once the controller has registered a checkpoint."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while not stop.is_set():
        time.sleep(0.05)
        try:
            if not json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                continue
        except (OSError, ValueError):
            continue
        for proc in psutil.Process(raylet).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            except psutil.Error:
                continue


@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_checkpoint_and_finishes(ray_local, tiny_dataset, tmp_path):
    run_dir, killed, stop = tmp_path / "killed", [], threading.Event()
    killer = threading.Thread(target=_kill_one_worker_after_first_checkpoint, args=(run_dir, killed, stop), daemon=True)
    killer.start()
    try:
        result = train(tiny_config(tiny_dataset, tmp_path, run_name="killed", max_steps=60, save_every=10, eval_every=10,
                                   micro_batch_size=8, gradient_accumulation_steps=4, max_failures=2,
                                   ingest="ray_data"))  # a restarted worker group reads again through Ray Data
    finally:
        stop.set()
    assert len(killed) == 1, "the worker was not killed while the run was going"
    starts = [m for m in read_metrics(run_dir) if m.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] >= 10
    assert result["status"] == "finished" and result["step"] == 60
    assert sorted(trace(run_dir)) == list(range(1, 61))
