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


def test_the_guard_imports_nothing_heavy():
    import subprocess

    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _quiet; assert not {{'torch', 'ray'}} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
