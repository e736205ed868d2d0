"""The console: plain progress lines at a bounded rate, the training line's ETA, the metrics file
follower, and a quiet session that keeps the terminal for rayllm's lines and sends the rest of the
process's output (print, logging, warnings, C-level writes) to the log file."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rayllm import console

ROOT = Path(__file__).parents[2]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_whole_lines_at_a_bounded_rate():
    out, clock = io.StringIO(), FakeClock()
    con = console.Console(out, tty=False, every_s=10.0, clock=clock)
    with con.progress("train pretrain") as bar:
        for second in range(26):  # an update every second for 25 s
            clock.now = float(second)
            bar.update(f"step {second}/25")
        bar.note("loss spike at step 7")
    lines = out.getvalue().splitlines()
    # t=0, 10 and 20, the note, and the last state once more at the end: not 26 lines
    assert lines == ["[rayllm] train pretrain  step 0/25", "[rayllm] train pretrain  step 10/25",
                     "[rayllm] train pretrain  step 20/25", "[rayllm] train pretrain: loss spike at step 7",
                     "[rayllm] train pretrain  step 25/25"]
    assert out.getvalue().endswith("\n") and "\r" not in out.getvalue()


def test_plain_progress_does_not_repeat_a_line_already_printed():
    out, clock = io.StringIO(), FakeClock()
    con = console.Console(out, tty=False, every_s=10.0, clock=clock)
    with con.progress("prepare sft") as bar:
        bar.update("tokenize+pack  100 rows")
    assert out.getvalue() == "[rayllm] prepare sft  tokenize+pack  100 rows\n"


def test_tty_progress_leaves_one_final_line():
    out = io.StringIO()
    con = console.Console(out, tty=True)
    with con.progress("sweep lr") as bar:
        bar.update("trials 1/3 done")
        bar.update("trials 3/3 done")
    assert out.getvalue().splitlines()[-1] == "[rayllm] sweep lr  trials 3/3 done"


def test_eta_from_the_pace_of_this_session():
    assert console.eta_s([(100.0, 10)], 60) is None
    assert console.eta_s([(100.0, 10), (110.0, 20)], 60) == 40.0
    assert console.eta_s([(100.0, 10), (110.0, 60)], 60) == 0.0
    assert console.clock_text(None) == "--:--"
    assert console.clock_text(42) == "0:42" and console.clock_text(3725) == "1:02:05"


def test_train_view_shows_step_loss_tokens_and_eta_and_ignores_old_records_for_the_pace():
    out = io.StringIO()
    con = console.Console(out, tty=False, every_s=0.0)
    with con.progress("train ft") as bar:
        view = console.TrainView(bar, total=60, since=1000.0)
        view.record({"time": 10.0, "step": 5, "loss": 9.0, "tokens_per_s": 1.0})  # a resumed run's earlier attempt
        view.record({"time": 1000.0, "step": 10, "loss": 7.0, "tokens_per_s": 1500.0})
        view.record({"time": 1001.0, "event": "eval", "step": 10, "val_loss": 7.25, "val_ppl": 1400.0})
        view.record({"time": 1010.0, "step": 20, "loss": 6.5, "tokens_per_s": 2500.0})
        view.record({"time": 1011.0, "event": "rollback", "step": 21, "reason": "loss 99 > 3 × median", "restored_step": 20})
    lines = out.getvalue().splitlines()
    assert lines[-2] == "[rayllm] train ft  step 20/60  loss 6.5000  val 7.2500  2,500 tok/s  ETA 0:40"
    assert lines[-1] == "[rayllm] train ft: loss spike at step 21 (loss 99 > 3 × median); back to step 20"
    assert "ETA --:--" in lines[0]  # one point of this session: no pace yet


def test_follow_jsonl_reads_whole_lines_only_and_restarts_on_a_rewritten_file(tmp_path):
    path, seen = tmp_path / "metrics.jsonl", []
    with console.follow_jsonl(path, seen.append, every_s=0.02):
        time.sleep(0.1)  # the file does not exist yet
        with path.open("w") as f:
            f.write(json.dumps({"step": 1}) + "\n" + '{"step": ')
            f.flush()
            time.sleep(0.1)
            assert seen == [{"step": 1}]  # the half-written line waits
            f.write("2}\n")
            f.flush()
            time.sleep(0.1)
        path.write_text(json.dumps({"step": 1}) + "\n")  # a resumed run truncates what it lost
        time.sleep(0.1)
        with path.open("a") as f:
            f.write(json.dumps({"step": 2, "resumed": True}) + "\n")
    assert seen[:2] == [{"step": 1}, {"step": 2}]
    assert seen[-1] == {"step": 2, "resumed": True}


SESSION_SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from rayllm import console
    with console.session(sys.argv[1], title="test") as con:
        print("a library's print")
        logging.getLogger("ray.data").warning("a library's log record")
        warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
        os.write(1, b"a C extension on fd 1\\n")
        os.write(2, b"a C extension on fd 2\\n")
        con.say("step line")
        with con.progress("train x") as bar:
            bar.update("step 1/2")
            print("(RayTrainWorker pid=1) forwarded worker output", flush=True)
            bar.update("step 2/2")
    print("after the session")
    if len(sys.argv) > 2:
        with console.session(sys.argv[1], title="fails"):
            print("what led to it")
            raise RuntimeError("boom")
""")


def _run_session(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "run" / "rayllm.log"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", SESSION_SCRIPT, str(log), *extra], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    return proc, log


def test_quiet_session_keeps_the_terminal_for_rayllm_lines_and_logs_the_rest(tmp_path):
    proc, log = _run_session(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"[rayllm] Ray's, the workers' and the libraries' output goes to {log} (--verbose shows it here)"
    assert lines[1:] == ["[rayllm] step line", "[rayllm] train x  step 1/2", "[rayllm] train x  step 2/2", "after the session"]
    assert proc.stderr == ""
    text = log.read_text()
    for what in ("a library's print", "a library's log record", "a deprecation", "a C extension on fd 1",
                 "a C extension on fd 2", "forwarded worker output", "[rayllm] step line", "[rayllm] train x  step 2/2"):
        assert what in text, what
    assert "after the session" not in text


def test_quiet_session_failure_restores_the_terminal_and_shows_the_log_tail(tmp_path):
    proc, log = _run_session(tmp_path, "fail")
    assert proc.returncode == 1
    assert re.search(rf"\[rayllm\] stopped; the last lines of {re.escape(str(log))}:", proc.stdout)
    assert "what led to it" in proc.stdout  # the tail of the log, before the traceback
    assert "boom" not in proc.stdout
    assert "RuntimeError: boom" in proc.stderr  # the traceback reaches the terminal
    assert "RuntimeError: boom" in log.read_text()  # and the log


def test_sweep_line_counts_trials_and_the_callback_pickles_without_its_view():
    import pickle
    from types import SimpleNamespace

    from rayllm.tune.progress import SweepView, TrialProgress

    out = io.StringIO()
    con = console.Console(out, tty=False, every_s=0.0)
    a, b = SimpleNamespace(trial_id="t0", status="RUNNING"), SimpleNamespace(trial_id="t1", status="PENDING")
    callback = TrialProgress()
    with con.progress("sweep lr") as bar:
        TrialProgress.view = SweepView(bar, expected=2, max_steps=24)
        try:
            # Tune pickles its callbacks with the experiment state; the view (a lock, the terminal) must not go with it
            assert pickle.loads(pickle.dumps(callback)).__dict__ == {}
            callback.on_trial_result(0, [a, b], a, {"step": 12, "val_loss": 6.5})
            callback.on_trial_complete(1, [a, b], a)  # Tune marks it TERMINATED after its callbacks
            a.status, b.status = "TERMINATED", "RUNNING"
            callback.on_trial_result(2, [a, b], b, {"step": 6, "val_loss": 6.75})
            callback.on_trial_complete(3, [a, b], b)
        finally:
            TrialProgress.view = None
    lines = [re.sub(r"  \d+:\d\d$", "", line) for line in out.getvalue().splitlines()]
    assert lines[0] == "[rayllm] sweep lr  trials 0/2 done  t0 step 12/24  best val 6.5000"
    assert "[rayllm] sweep lr: trial t0 stopped early (ASHA) at step 12/24" in lines
    assert "[rayllm] sweep lr: trial t1 stopped early (ASHA) at step 6/24" in lines
    assert lines[-1] == "[rayllm] sweep lr  trials 2/2 done  best val 6.5000"
    callback.on_trial_complete(4, [a, b], b)  # no sweep running: nothing to show, no error


def test_sweep_line_shows_the_best_of_the_metric_trials_are_ranked_by():
    """A DPO sweep ranked by val preference accuracy: the highest value is the best, under its own name."""
    from types import SimpleNamespace

    from rayllm.tune.progress import SweepView

    out = io.StringIO()
    con = console.Console(out, tty=False, every_s=0.0)
    trial = SimpleNamespace(trial_id="t0", status="RUNNING")
    with con.progress("sweep dpo") as bar:
        view = SweepView(bar, expected=1, max_steps=24, metric="val_rewards/accuracies")
        for step, accuracy in ((6, 0.5), (12, 0.75), (18, 0.625)):
            view.trial_result("t0", {"step": step, "val_loss": 0.6, "val_rewards/accuracies": accuracy})
            view.show([trial])
    assert re.sub(r"  \d+:\d\d$", "", out.getvalue().splitlines()[-1]) == \
        "[rayllm] sweep dpo  trials 0/1 done  t0 step 18/24  best val_rewards/accuracies 0.7500"


def test_verbose_session_redirects_nothing_and_writes_no_log(tmp_path, capsys):
    with console.session(tmp_path / "rayllm.log", verbose=True) as con:
        print("a library's print")
        con.say("step line")
        with con.progress("train x") as bar:
            bar.update("step 1/1")
    assert capsys.readouterr().out.splitlines() == ["a library's print", "[rayllm] step line", "[rayllm] train x  step 1/1"]
    assert not (tmp_path / "rayllm.log").exists() and console.get().log_path is None
