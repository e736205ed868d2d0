"""The benchmarks' guard (benchmarks/_quiet.py): which rounds count, and what is said when none does."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def quiet():
    spec = importlib.util.spec_from_file_location("bench_quiet", BENCH / "_quiet.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def fig(quiet, value, others):
    return quiet.Figure(value=value, others=others)


def test_contended_above_a_quarter_core(quiet):
    assert quiet.BUSY == 0.25
    assert not fig(quiet, 1.0, 0.0).contended
    assert not fig(quiet, 1.0, 0.25).contended
    assert fig(quiet, 1.0, 0.26).contended
    assert fig(quiet, 1.0, 1.5).contended


def test_ratio_uses_clean_rounds_only(quiet):
    base = [fig(quiet, 100, 0.01), fig(quiet, 50, 0.90), fig(quiet, 100, 0.10)]
    ours = [fig(quiet, 80, 0.02), fig(quiet, 200, 0.00), fig(quiet, 90, 0.30)]
    r = quiet.ratio(ours, base)
    assert r.clean == [0]  # round 2: the baseline was contended; round 3: ours was
    assert r.value == pytest.approx(0.80)
    assert r.text() == "0.80x (clean rounds 1 of 3)"


def test_ratio_is_the_ratio_of_clean_medians(quiet):
    base = [fig(quiet, v, 0.0) for v in (100, 120, 80)]
    ours = [fig(quiet, v, 0.0) for v in (70, 100, 60)]
    r = quiet.ratio(ours, base)
    assert r.clean == [0, 1, 2]
    assert r.value == pytest.approx(70 / 100)


def test_no_clean_round_no_ratio(quiet):
    base = [fig(quiet, 100, 0.5), fig(quiet, 100, 0.0)]
    ours = [fig(quiet, 80, 0.0), fig(quiet, 80, 0.7)]
    r = quiet.ratio(ours, base)
    assert r.value is None and r.clean == []
    assert r.text() == "no clean round: no ratio"


def test_clean_rounds_over_several_sides(quiet):
    a = [fig(quiet, 1, 0.0), fig(quiet, 1, 0.0)]
    b = [fig(quiet, 1, 0.0), fig(quiet, 1, 0.3)]
    c = [fig(quiet, 1, 0.0), fig(quiet, 1, 0.0)]
    assert quiet.clean_rounds(a, b, c) == [0]


def test_note_prints_others_state_and_capability(quiet):
    line = quiet.note(quiet.Figure(1.0, 0.42, 3.0, [("python -m pytest", 0.40)]), "AVX512")
    assert "others 0.42 cores (python -m pytest 0.40) [CONTENDED]" in line
    assert "CPU capability AVX512" in line
    assert "[clean]" in quiet.note(fig(quiet, 1.0, 0.1), "AVX2")


def test_the_side_includes_children_that_exit_inside_the_window(quiet):
    """A child's CPU is the side's, even when it ends before the window closes (its time moves to
    the parent's cutime once reaped), so it is not blamed on other jobs."""
    import subprocess

    sampler = sys.modules[quiet.snapshot.__module__]
    before = sampler.snapshot()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"],
                   check=True)
    time.sleep(0.05)
    u = sampler.usage(before, sampler.snapshot(), (os.getpid(),))
    assert u["side"] * u["seconds"] >= 0.4


def test_the_side_includes_orphans_that_die_inside_the_window(quiet, tmp_path):
    """A grandchild whose parent exits first is reparented to init and reaped there: no side process
    ever holds its CPU (Ray's workers when the raylet stops). Seen by the window's samples, it is
    still the side's, not other jobs'."""
    import subprocess

    sampler = sys.modules[quiet.snapshot.__module__]
    done = tmp_path / "done"
    burn = f"import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\nopen({str(done)!r}, 'w')"
    # the child starts the burner, lives a moment (as a raylet does), then exits: the burner lives on
    spawn = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(0.3)"
    track = sampler.TreeSampler((os.getpid(),), period=0.1)
    track.start()
    t0 = time.time()
    subprocess.run([sys.executable, "-c", spawn], check=True)
    deadline = time.time() + 30
    while not done.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the orphan exits and init reaps it
    t1 = time.time()
    track.stop()
    u = track.usage(t0, t1)
    assert u["side"] * u["seconds"] >= 0.5
    without = sampler.usage(track.samples[0], track.samples[-1], (os.getpid(),))  # the two ends only
    assert without["side"] * without["seconds"] < 0.35


def test_the_guard_imports_nothing_heavy():
    import subprocess

    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _quiet; assert not {{'torch', 'ray'}} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_time_the_hypervisor_gave_to_other_machines_counts_as_contention(quiet):
    """Steal time (other tenants of a virtual machine's host) squeezes a round as other processes do:
    it is counted with them and printed beside the figure."""
    assert not quiet.Figure(1.0, 0.10, steal=0.10).contended
    assert quiet.Figure(1.0, 0.10, steal=0.20).contended
    assert "steal 0.20 cores [CONTENDED]" in quiet.note(quiet.Figure(1.0, 0.10, steal=0.20), "AVX512")
    assert "steal" not in quiet.note(quiet.Figure(1.0, 0.10), "AVX512")


def test_the_sampler_reads_the_machines_steal_time(quiet):  # quiet puts benchmarks/ on sys.path
    import _cpu_sampler as sampler

    a = sampler.snapshot()
    b = sampler.snapshot()
    assert 0.0 <= a.steal <= b.steal
    assert sampler.usage(a, b, (0,))["steal"] >= 0.0
