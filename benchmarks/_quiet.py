"""The guard every benchmark puts around its timed windows, so a busy machine cannot fool it.

Before each timed side: wait (bounded) until processes outside the benchmark use at most QUIET
cores. During the window: account the cores used by processes outside the measured side (the
benchmark's own process tree, which holds the servers, launchers and Ray processes it started),
and on a virtual machine the cores the hypervisor gave to other machines (steal time in /proc/stat:
other tenants' jobs, which no process list shows). Each figure is printed with those cores and the
CPU capability; a round in which others and steal together took more than BUSY cores in any of its
windows is *contended*, and ratios come from clean rounds only.

The policy (classification, ratio, wording) is pure and unit-tested; measuring is in `window`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_sampler import TreeSampler, snapshot, usage  # noqa: E402

BUSY = 0.25  # cores others may use in a timed window before the round counts as contended
QUIET = 0.15  # cores others may use while we wait, before a timed side starts
WAIT_LIMIT = 60.0  # seconds to wait for a quiet machine at most
NO_RATIO = "no clean round: no ratio"


def is_contended(others: float, busy: float = BUSY) -> bool:
    return others > busy


@dataclass
class Figure:
    """One timed side in one round: its figure and what other jobs did meanwhile."""

    value: float
    others: float  # cores used by processes outside the measured side during the window
    waited: float = 0.0  # seconds spent waiting for a quiet machine first
    others_top: list[tuple[str, float]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    steal: float = 0.0  # cores the hypervisor gave to other machines during the window

    @property
    def contended(self) -> bool:
        return is_contended(self.others + self.steal)


@dataclass
class Ratio:
    value: float | None  # median(num) / median(den) over clean rounds; None without one
    clean: list[int]  # 0-based rounds used
    rounds: int

    def text(self, digits: int = 2) -> str:
        if self.value is None:
            return NO_RATIO
        used = ", ".join(str(i + 1) for i in self.clean)
        return f"{self.value:.{digits}f}x (clean rounds {used} of {self.rounds})"


def clean_rounds(*sides: list[Figure]) -> list[int]:
    """Rounds (0-based) in which no given side's window was contended."""
    n = min(len(s) for s in sides)
    return [i for i in range(n) if not any(s[i].contended for s in sides)]


def ratio(num: list[Figure], den: list[Figure]) -> Ratio:
    """num / den of the medians over rounds where both windows were clean."""
    clean = clean_rounds(num, den)
    if not clean:
        return Ratio(None, [], min(len(num), len(den)))
    value = statistics.median(num[i].value for i in clean) / statistics.median(den[i].value for i in clean)
    return Ratio(value, clean, min(len(num), len(den)))


def note(fig: Figure, capability: str) -> str:
    """What is printed beside every figure."""
    top = ", ".join(f"{n} {v:.2f}" for n, v in fig.others_top)
    state = "CONTENDED" if fig.contended else "clean"
    stolen = f", steal {fig.steal:.2f} cores" if fig.steal >= 0.005 else ""
    return (f"others {fig.others:.2f} cores{f' ({top})' if top else ''}{stolen} [{state}], "
            f"waited {fig.waited:.0f} s for quiet, CPU capability {capability}")


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def side_roots() -> tuple[int, ...]:
    """The measured side: this process's tree (what it started, Ray included, descends from it)."""
    return (os.getpid(),)


def wait_quiet(limit: float = WAIT_LIMIT, cores: float = QUIET, every: float = 3.0) -> float:
    """Wait, up to `limit` s, until processes outside this benchmark's tree used at most `cores`
    over `every` s; the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        before = snapshot()
        time.sleep(every)
        u = usage(before, snapshot(), side_roots())
        if u["others"] + u["steal"] <= cores:
            break
    return time.perf_counter() - t0


class Window:
    """Filled in when the `with window()` block ends."""

    seconds = others = waited = steal = 0.0
    others_top: list = []

    def figure(self, value: float, **extra) -> Figure:
        return Figure(value, self.others, self.waited, self.others_top, extra, self.steal)


@contextmanager
def window(wait: float = WAIT_LIMIT) -> Iterator[Window]:
    """Time the block as one guarded window: wait for quiet first (up to `wait` s), then snapshot
    /proc around it."""
    w = Window()
    w.waited = wait_quiet(wait) if wait > 0 else 0.0
    track = TreeSampler(side_roots(), period=0.5)  # who belongs to the side, for processes that die in the window
    track.start()
    try:
        yield w
    finally:
        track.stop()
    u = usage(track.samples[0], track.samples[-1], side_roots(), between=track.samples[1:-1])
    w.seconds, w.others, w.others_top, w.steal = u["seconds"], u["others"], u["others_top"], u["steal"]


def sampler() -> TreeSampler:
    """A periodic sampler of this benchmark's tree, for windows known only afterwards."""
    return TreeSampler(side_roots())
