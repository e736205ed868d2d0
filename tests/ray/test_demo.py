"""The README's first quickstart command, exactly: `rayllm demo` (what `make demo` runs after setup),
in a subprocess with its own embedded Ray, from raw text to an answered request and a clean exit;
and what a person sees of it: a short console of whole rayllm lines, the rest in the log file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rayllm.demo import SIGNATURE
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
        assert re.search(rf"^=== {stage} done in \d+ s ===$", out, re.M), stage
    _assert_quiet_console(out)
    # The OpenAI client asked the base and the promoted adapter (which names its version) the same thing:
    # the fine-tuned SmolLM2 answers in the trained voice, opening with the signature; the base does not.
    answer = r" → \[{}\] (['\"])(.+)\1 \(\d+ tokens, [\d.]+ s\)$"
    base = re.search(r"^\[rayllm\] +base" + answer.format("base"), out, re.M)
    tuned = re.search(r"^\[rayllm\] +botchan:prod" + answer.format(r"botchan@v\d+"), out, re.M)
    assert base and tuned, out[-3000:]
    assert base.group(2) != tuned.group(2)
    assert tuned.group(2).startswith(SIGNATURE) and SIGNATURE not in base.group(2), (base.group(2), tuned.group(2))
    work = tmp_path / "demo"
    assert json.loads((work / "data" / "pretrain" / "manifest.json").read_text())["splits"]["train"]["sequences"] > 0
    assert json.loads((work / "train" / "pretrain" / "result.json").read_text())["status"] == "finished"
    assert json.loads((work / "train" / "finetune" / "result.json").read_text())["status"] == "finished"
    summary = json.loads((work / "sweeps" / "lr" / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["published"].startswith("botchan@v")
    assert (work / "registry").is_dir()
    assert "demo finished" in out


# The progress line of a training run, whole: nothing else written into it or after it.
TRAIN_LINE = re.compile(r"\[rayllm\] train \w+  (starting|step \d+/\d+  loss \d+\.\d{4}(  val \d+\.\d{4})?  [\d,]+ tok/s  ETA [\d:-]+)")


def _assert_quiet_console(out: str) -> None:
    """At most 200 lines, every `[rayllm]` line whole, and the summary naming the log file that holds
    Ray's, the workers' and the libraries' output."""
    lines = out.rstrip("\n").split("\n")  # not splitlines(): a carriage return inside a line must show
    assert len(lines) <= 200, f"{len(lines)} lines; most repeated: {Counter(l[:60] for l in lines).most_common(5)}"
    ours = [line for line in lines if line.startswith("[rayllm]")]
    assert len(ours) >= 20, out  # the stages' progress and summaries
    for line in ours:
        # a line cut by another writer has its text (Ray's worker prefix, a progress bar, a second line) in it
        assert line.count("[rayllm]") == 1 and "pid=" not in line and "\r" not in line and "\x1b" not in line, line
        if line.startswith("[rayllm] train ") and "  " in line.split(": ")[0]:
            assert TRAIN_LINE.fullmatch(line), line
    assert any(re.fullmatch(r"\[rayllm\] train pretrain  step 60/60  .+", line) for line in ours), ours
    named = re.search(r"^demo finished in \d+ s; artifacts under \S+; log (\S+)$", out, re.M)
    assert named, out[-2000:]
    log = Path(named.group(1)).read_text()
    # Ray's own, the forwarded output of Ray Train's workers, transformers loading SmolLM2 in them, and vLLM in Serve's replicas
    for source in ("Started a local Ray instance", "(RayTrainWorker pid=", "Loading weights", "vLLM"):
        assert source in log, source
    assert "(RayTrainWorker pid=" not in out
