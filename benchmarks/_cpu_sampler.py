"""Where the CPU went during a timed window, from /proc: the CPU time of every process under a set of
root pids (the measured side: a benchmark's own process tree, with the Ray daemons, actors and
workers, servers and launchers it started) and the busy time of the whole machine. What the machine
spent beyond the measured side is the cores other jobs took: on a shared machine that tells a clean
measurement from one that other jobs squeezed.

A process of the side that exits inside the window is still counted: once its parent reaps it, its
CPU time moves into the parent's cutime/cstime, and the side's total includes those fields."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    ppid: int
    name: str
    cpu: float  # own user + system CPU seconds
    reaped: float  # CPU seconds of children it has waited for (cutime + cstime)


@dataclass(frozen=True)
class Snapshot:
    time: float
    busy: float  # busy CPU seconds of the whole machine since boot
    procs: dict[int, Proc] = field(repr=False)
    steal: float = 0.0  # CPU seconds the hypervisor gave to other machines since boot


def _name(comm: str, cmd: list[bytes]) -> str:
    if comm.startswith("python") and len(cmd) > 1:  # name Python processes by script or module
        args = [a.decode(errors="replace") for a in cmd[1:] if a and a != b"-u"]
        if args:
            return "python " + (" ".join(args[:2]) if args[0] == "-m" else Path(args[0]).name)
    return comm


def _procs() -> dict[int, Proc]:
    """Every process readable now."""
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
        out[int(d.name)] = Proc(int(rest[1]), _name(comm, cmd), (int(rest[11]) + int(rest[12])) / TICK,
                                (int(rest[13]) + int(rest[14])) / TICK)
    return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot: user, nice, system, irq, softirq (not idle,
    iowait, or steal, which is time the hypervisor gave to other machines)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6)) / TICK


def machine_steal() -> float:
    """CPU seconds since boot that this (virtual) machine's CPUs were ready to run but the hypervisor
    ran other machines: the jobs of other tenants, which no process list here shows."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[7]) / TICK if len(fields) > 7 else 0.0


def snapshot() -> Snapshot:
    return Snapshot(time.time(), machine_busy(), _procs(), machine_steal())


def tree(procs: dict[int, Proc], roots: tuple[int, ...]) -> set[int]:
    children = defaultdict(list)
    for pid, p in procs.items():
        children[p.ppid].append(pid)
    found, todo = set(), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children[pid]
    return found


def side_cpu(before: Snapshot, after: Snapshot, roots: tuple[int, ...], between: list[Snapshot] = ()) -> tuple[float, dict[int, Proc]]:
    """CPU seconds the trees under `roots` used from `before` to `after`, and the last view of every
    process seen in them (`between`: snapshots taken inside the window).

    A side process that exits inside the window is counted however it goes:
      * reaped by a side process still alive: its whole CPU moved into that parent's `reaped`, which
        is counted, so only what it had used before the window is taken back out — unless the parent's
        reaped time did not grow to hold it (Ray's exited pool actors): then its last view counts;
      * orphaned (its parent died first: Ray's workers when the raylet stops at `ray.shutdown()`) and
        reaped by init: nothing of the side holds its CPU any more, so its last view counts, up to the
        last snapshot that saw it (`between` samples keep that tail short).
    """
    seen: dict[int, Proc] = {}
    members: list[set[int]] = []
    for snap in [before, *between, after]:
        # once a process belongs to the side it stays the side's (with its descendants), also after it
        # is reparented to init; a reused pid (another name) is not the same process
        alive = tuple(pid for pid, p in seen.items() if pid in snap.procs and snap.procs[pid].name == p.name)
        now = tree(snap.procs, roots + alive)
        for pid in now:
            seen[pid] = snap.procs[pid]
        members.append(now)
    side_before, side_after = members[0], members[-1]
    # Ray's pool actors that exit inside the window did not reach their parent's reaped time: an exited
    # child counts by its last view unless its parent's reaped time grew by at least half of what its
    # exited children had used.
    exited: dict[int, float] = {}
    for pid, last in seen.items():
        if pid not in side_after and last.ppid in side_after:
            exited[last.ppid] = exited.get(last.ppid, 0.0) + last.cpu + last.reaped
    collected = set()
    for ppid, used in exited.items():
        first = before.procs.get(ppid)
        grown = after.procs[ppid].reaped - (first.reaped if first is not None and ppid in side_before else 0.0)
        if grown >= 0.5 * used:
            collected.add(ppid)
    total = 0.0
    for pid, last in seen.items():
        first = before.procs.get(pid)
        start = first.cpu + first.reaped if pid in side_before else 0.0
        if pid in side_after:
            total += last.cpu + last.reaped - start
        elif last.ppid in collected:
            total -= start  # its CPU since birth is in the parent's reaped time
        else:
            total += last.cpu + last.reaped - start
    return max(0.0, total), seen


def usage(before: Snapshot, after: Snapshot, roots: tuple[int, ...], ranks: int = 0, between: list[Snapshot] = ()) -> dict:
    """Cores used between two snapshots: `side` by the trees under `roots`, `others` by everything
    else on the machine (`others_top`: the busiest other processes, named); with `ranks` > 0 also the
    `ranks` busiest processes of the side (training ranks) and the rest of the side (`own_other`,
    `own_other_top`). `between`: snapshots taken inside the window, so side processes that die in it
    without a side parent to reap them still count as the side's (see `side_cpu`)."""
    span = max(after.time - before.time, 1e-9)
    side, seen = side_cpu(before, after, roots, between)
    side_after = {pid for pid in seen if pid in after.procs and after.procs[pid] == seen[pid]}

    def delta(pid: int) -> float:
        p, q = after.procs[pid], before.procs.get(pid)
        return p.cpu - (q.cpu if q and q.name == p.name else 0.0)

    own = sorted(((after.procs[p].name, delta(p)) for p in side_after), key=lambda v: -v[1])
    named = defaultdict(float)
    for pid in after.procs.keys() - seen.keys():  # those born inside the window too (a test run started meanwhile)
        named[after.procs[pid].name] += delta(pid) / span
    out = {"seconds": span, "side": side / span, "others": max(0.0, (after.busy - before.busy - side) / span),
           "steal": max(0.0, (after.steal - before.steal) / span),
           "others_top": sorted(((n, v) for n, v in named.items() if v >= 0.005), key=lambda kv: -kv[1])[:3]}
    if ranks:
        rest = defaultdict(float)
        for name, cpu in own[ranks:]:
            rest[name] += cpu / span
        out["ranks"] = sum(cpu for _, cpu in own[:ranks]) / span
        out["own_other"] = max(0.0, out["side"] - out["ranks"])
        out["own_other_top"] = sorted(rest.items(), key=lambda kv: -kv[1])[:5]
    return out


class TreeSampler(threading.Thread):
    """Snapshots every `period` s, for windows whose ends are known only afterwards (timestamps a
    subprocess logged); `usage(t0, t1)` uses the snapshots around [t0, t1]."""

    def __init__(self, roots: tuple[int, ...] = (os.getpid(),), period: float = 1.0):
        super().__init__(daemon=True)
        self.roots, self.period, self.samples = roots, period, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(snapshot())
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append(snapshot())

    def usage(self, t0: float, t1: float, ranks: int = 0) -> dict:
        before = max((s for s in self.samples if s.time <= t0), key=lambda s: s.time, default=self.samples[0])
        after = min((s for s in self.samples if s.time >= t1), key=lambda s: s.time, default=self.samples[-1])
        between = [s for s in self.samples if before.time < s.time < after.time]
        return usage(before, after, self.roots, ranks, between)
