"""The README's first quickstart command, exactly: `rayllm demo` (what `make demo` runs after setup),
in a subprocess with its own embedded Ray, from raw text to an answered request and a clean exit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.ray.serve_fixtures import free_port

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_readme_demo_runs_the_whole_life_cycle(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYLLM_STORAGE")}
    log_path = tmp_path / "demo.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rayllm", "demo", "--workdir", str(tmp_path / "demo"),
                                 "--port", str(free_port())], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=1400)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # only the process group this test started
    out = log_path.read_text()
    assert code == 0, out[-5000:]
    for stage in ("prepare", "pretrain", "finetune", "sweep", "serve"):
        assert re.search(rf"=== {stage} done in \d+ s ===", out), stage
    # The OpenAI client got an answer from the base and from the promoted adapter, which names its version.
    assert re.search(r"base → \[base\] '.+'", out), out[-3000:]
    assert re.search(r"botchan:prod → \[botchan@v\d+\] '.+'", out), out[-3000:]
    work = tmp_path / "demo"
    assert json.loads((work / "data" / "pretrain" / "manifest.json").read_text())["splits"]["train"]["sequences"] > 0
    assert json.loads((work / "train" / "pretrain" / "result.json").read_text())["status"] == "finished"
    assert json.loads((work / "train" / "finetune" / "result.json").read_text())["status"] == "finished"
    summary = json.loads((work / "sweeps" / "lr" / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["published"].startswith("botchan@v")
    assert (work / "registry").is_dir()
    assert "demo finished" in out
