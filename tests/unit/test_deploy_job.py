"""jobs/deploy.py deploys onto a running cluster only: without one it says what to do and exits 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_deploy_job_without_a_cluster_refuses_in_one_line_and_starts_no_ray(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")  # a Ray started by mistake would leave its session here
    config = "jobs/configs/serve_tiny.yaml"
    done = subprocess.run([sys.executable, "jobs/deploy.py", config], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "RAY_ADDRESS" in lines[0] and "--address" in lines[0] and f"rayllm serve {config}" in lines[0]
    assert done.stdout == "" and not (tmp_path / "ray").exists()
