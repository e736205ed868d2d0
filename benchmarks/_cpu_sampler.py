"""Where the CPU went during a timed window: a thread that samples, once a second, the CPU time of
every process under one root pid (a benchmark side and all it started: Ray's daemons, actors,
workers, launcher) and the busy time of the whole machine, from /proc. On a shared machine this
tells a clean measurement from one that other jobs squeezed."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, str, float]]:
    """pid → (ppid, name, CPU seconds) of every process readable now."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        name = comm
        if comm.startswith("python") and len(cmd) > 1:  # name Python processes by script or module
            args = [a.decode(errors="replace") for a in cmd[1:] if a and a != b"-u"]
            name = "python " + (" ".join(args[:2]) if args[0] == "-m" else Path(args[0]).name)
        out[int(d.name)] = (int(rest[1]), name, (int(rest[11]) + int(rest[12])) / TICK)
    return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


class TreeSampler(threading.Thread):
    def __init__(self, root: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.period, self.samples = root, period, []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        procs = _procs()
        children = defaultdict(list)
        for pid, (ppid, _, _) in procs.items():
            children[ppid].append(pid)
        tree, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if pid in procs:
                tree[pid] = procs[pid][1:]
                todo += children[pid]
        self.samples.append((time.time(), machine_busy(), tree))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def usage(self, t0: float, t1: float, ranks: int = 2) -> dict:
        """Cores used between the samples around [t0, t1]: by the `ranks` busiest processes of the
        tree (the training ranks), by the rest of the tree (named, busiest first), and by everything
        else on the machine."""
        before = max((s for s in self.samples if s[0] <= t0), key=lambda s: s[0], default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= t1), key=lambda s: s[0], default=self.samples[-1])
        span = max(after[0] - before[0], 1e-9)
        delta = {pid: (name, cpu - before[2].get(pid, (name, 0.0))[1]) for pid, (name, cpu) in after[2].items()}
        busiest = sorted(delta.values(), key=lambda v: -v[1])
        others = defaultdict(float)
        for name, cpu in busiest[ranks:]:
            others[name] += cpu / span
        tree = sum(cpu for _, cpu in busiest)
        return {"ranks": sum(cpu for _, cpu in busiest[:ranks]) / span, "own_other": (tree - sum(c for _, c in busiest[:ranks])) / span,
                "own_other_top": sorted(others.items(), key=lambda kv: -kv[1])[:5],
                "rest_of_machine": (after[1] - before[1] - tree) / span}
