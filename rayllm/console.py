"""What a person sees while a stage runs: whole `[rayllm]` lines and one live progress line per
stage, while Ray's, the libraries' and the workers' output goes to a log file.

`session(log_path)` points file descriptors 1 and 2 at the log file (so everything written by this
process, by C extensions and by Ray's log forwarding lands there, whatever logger or `print` wrote
it) and keeps a private copy of the terminal for this console. Only the console writes to that
copy, so its lines are never cut by another writer. `--verbose` skips the redirection.

On a TTY the progress line is drawn by rich; otherwise it is printed as whole lines, at most one per
`every_s` seconds, and once more when the stage ends.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

PREFIX = "[rayllm]"
PLAIN_EVERY_S = 10.0
# Read by Ray Data in this process and, through a local Ray's raylet, in every worker.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


class Progress:
    """One live line: `update(text)` replaces it; on a TTY rich redraws it in place, elsewhere a
    whole line is printed when `every_s` has passed since the last one (the last text is printed
    again at `close` if it was not yet)."""

    def __init__(self, console: "Console", label: str, every_s: float):
        self.console, self.label, self.every_s = console, label, every_s
        self.text = ""
        self._printed: str | None = None
        self._last = -float("inf")
        self._live = None
        if console.tty:
            from rich.console import Console as RichConsole
            from rich.live import Live
            from rich.text import Text

            self._text = Text
            self._live = Live(Text(self._line("starting")), console=RichConsole(file=console.stream),
                              refresh_per_second=4, transient=True, redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def _line(self, text: str) -> str:
        return f"{PREFIX} {self.label}  {text}"

    def update(self, text: str) -> None:
        with self.console.lock:
            self.text = text
            if self._live is not None:
                self._live.update(self._text(self._line(text)))
                return
            now = self.console.clock()
            if now - self._last >= self.every_s:
                self._last = now
                self._printed = text
                self.console.write_term(self._line(text))

    def note(self, message: str) -> None:
        """A whole line above the progress line (an event worth keeping: a rollback, a finished trial)."""
        with self.console.lock:
            if self._live is not None:
                self._live.console.print(self._text(f"{PREFIX} {self.label}: {message}"))
                self.console.write_log(f"{PREFIX} {self.label}: {message}")
            else:
                self.console.write_term(f"{PREFIX} {self.label}: {message}")

    def close(self) -> None:
        with self.console.lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
                if self.text:
                    self.console.write_term(self._line(self.text))
            elif self.text and self.text != self._printed:
                self.console.write_term(self._line(self.text))


class Console:
    """Writes whole lines to `stream` (the terminal), and a copy to `log` when there is one."""

    def __init__(self, stream: TextIO, tty: bool | None = None, log: TextIO | None = None,
                 log_path: Path | None = None, every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.stream, self.log, self.log_path, self.every_s, self.clock = stream, log, log_path, every_s, clock
        self.tty = stream.isatty() if tty is None else tty
        self.lock = threading.RLock()

    def write_term(self, line: str) -> None:
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.write_log(line)

    def write_log(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()

    def say(self, message: str) -> None:
        """A whole line with rayllm's prefix."""
        self.write_term(f"{PREFIX} {message}")

    def echo(self, text: str) -> None:
        """Lines as they are (a table)."""
        for line in text.splitlines():
            self.write_term(line)

    @contextmanager
    def progress(self, label: str) -> Iterator[Progress]:
        bar = Progress(self, label, self.every_s)
        try:
            yield bar
        finally:
            bar.close()


_current: Console | None = None


def get() -> Console:
    """The console of this process: the session's, or plain stdout outside one (a library call, a
    Ray worker, whose stdout Ray forwards to the driver)."""
    return _current or Console(sys.stdout, tty=False)


@contextmanager
def session(log_path: str | Path, verbose: bool = False, title: str = "") -> Iterator[Console]:
    """The console for one CLI command. Quiet (the default): fds 1 and 2 go to `log_path`
    (appended to); the console keeps the terminal. Verbose: nothing is redirected."""
    global _current
    log_path = Path(log_path).resolve()
    if verbose:  # plain lines: a line redrawn in place would be torn by everyone else writing here
        _current = Console(sys.stdout, tty=False)
        try:
            yield _current
        finally:
            _current = None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    term_fd, saved_out, saved_err = os.dup(1), os.dup(1), os.dup(2)
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} rayllm {title}\n")
    term = open(term_fd, "w", buffering=1, encoding="utf-8", errors="replace")
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _current = Console(term, log=log, log_path=log_path)
    _current.say(f"Ray's, the workers' and the libraries' output goes to {log_path} (--verbose shows it here)")
    context = ""
    try:
        yield _current
    except BaseException as exc:
        from rayllm.config import ConfigError

        # A config error or Ctrl-C says all there is to say on stderr; a crash needs what led to it
        # (read before the traceback, which reaches the terminal anyway, is added to the log).
        if not isinstance(exc, (ConfigError, KeyboardInterrupt)):
            sys.stdout.flush()
            sys.stderr.flush()
            context = tail_log(log_path)
        sys.stderr.write(traceback.format_exc())
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _current = None
        if context:  # the traceback follows on stderr
            term.write(f"{PREFIX} stopped; the last lines of {log_path}:\n{context}\n")
        term.close()
        log.close()
        from rayllm.ray_session import restore_env

        restore_env(saved_env)


def tail_log(log_path: Path, lines: int = 20) -> str:
    """The last lines of a log, for a failure message."""
    try:
        return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- training progress, from the run's metrics.jsonl -------------------------------------------


def eta_s(points: list[tuple[float, int]], total: int) -> float | None:
    """Seconds left to step `total` at the pace of `points` ((time, step), oldest first); None
    until two points span a step."""
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    return max(0.0, (total - s1) * (t1 - t0) / (s1 - s0))


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class TrainView:
    """Turns metrics.jsonl records into the progress line: step/total, loss, tokens/s, ETA. The
    pace counts only records written after `since` (a resumed run's file holds its earlier steps)."""

    def __init__(self, bar: Progress, total: int, since: float):
        self.bar, self.total, self.since = bar, total, since
        self.points: list[tuple[float, int]] = []
        self.val: float | None = None
        self.fields: dict = {}

    def record(self, r: dict) -> None:
        event = r.get("event")
        if event == "eval" and r.get("val_loss") is not None:
            self.val = r["val_loss"]
        elif event == "rollback":
            self.bar.note(f"loss spike at step {r.get('step')} ({r.get('reason')}); back to step {r.get('restored_step')}")
            return
        elif event is None and "loss" in r and "step" in r:
            self.fields = r
            if r.get("time", self.since) >= self.since:
                self.points.append((r.get("time", 0.0), int(r["step"])))
        else:
            return
        self.bar.update(self.text())

    def text(self) -> str:
        r = self.fields
        if not r:
            return "starting"
        parts = [f"step {r['step']}/{self.total}", f"loss {r['loss']:.4f}"]
        if self.val is not None:
            parts.append(f"val {self.val:.4f}")
        parts += [f"{r.get('tokens_per_s', 0):,.0f} tok/s", f"ETA {clock_text(eta_s(self.points, self.total))}"]
        return "  ".join(parts)


@contextmanager
def follow_jsonl(path: Path, on_record: Callable[[dict], None], every_s: float = 0.5) -> Iterator[None]:
    """Calls `on_record` for each whole JSON line appended to `path` (from its start) while the
    block runs, from a thread; once more at the end for the last lines."""
    stop = threading.Event()
    state = {"offset": 0, "rest": b""}

    def poll() -> None:
        try:
            if os.path.getsize(path) < state["offset"]:  # rewritten (a resumed run drops its lost steps)
                state["offset"], state["rest"] = 0, b""
            with open(path, "rb") as f:
                f.seek(state["offset"])
                data = f.read()
        except OSError:  # not written yet
            return
        if len(data) == 0:
            return
        state["offset"] += len(data)
        *lines, state["rest"] = (state["rest"] + data).split(b"\n")
        for line in lines:
            try:
                on_record(json.loads(line))
            except ValueError:
                continue

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name="rayllm-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()


@contextmanager
def train_progress(label: str, metrics_path: Path, total_steps: int) -> Iterator[TrainView]:
    """The live line of a training run, fed from the metrics.jsonl rank 0 appends to (on this
    machine, or a disk it shares with rank 0's node)."""
    with get().progress(label) as bar:
        view = TrainView(bar, total_steps, since=time.time())
        with follow_jsonl(Path(metrics_path), view.record):
            yield view
