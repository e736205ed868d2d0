"""A real multi-node Ray cluster on this one machine, driven by the `ray` CLI as a user would.

Each node is a `ray start --block` process with its own ports, so ending that process ends
exactly its node (never a blanket `ray stop`: other clusters may share the machine). Ray 2.60
turns on token authentication for started clusters: every CLI call runs with RAY_AUTH_MODE=token
and the cluster's own token in RAY_AUTH_TOKEN (a fresh machine has no ~/.ray/auth_token, and
`ray start --head` does not create one).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rayllm.ray_session import LOCAL_RAY_ENV

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(), "--metrics-export-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port()}
    return [x for k, v in ports.items() for x in (k, str(v))]


class LocalCluster:
    """`with LocalCluster(tmp, nodes=2, cpus=1) as c:` — a head plus worker nodes, each `cpus` CPUs."""

    def __init__(self, log_dir: Path, nodes: int = 2, cpus: int = 1):
        self.log_dir, self.nodes, self.cpus = Path(log_dir), nodes, cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                    **LOCAL_RAY_ENV,  # a small test cluster that is never drained: as a local Ray
                    # Torn down whole: on SIGTERM a node otherwise waits up to 30 s for its Serve
                    # replicas to move elsewhere (Ray's drain on SIGTERM), and there is nowhere to go.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        # Ray Train asks this state API whether its runs live (see tests/shared_ray.py): this cluster's own.
        self.env["RAY_API_SERVER_ADDRESS"] = self.dashboard

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], name: str) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        # Its own temp dir per node: nodes sharing one would unpack each job's working_dir into the
        # same folder, and one node's fresh unpack pulls the directory from under the other's driver.
        temp = tempfile.mkdtemp(prefix=f"rl{name[:2]}", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        self.temp_dirs.append(temp)
        common = ["--temp-dir", temp, "--block", "--num-cpus", str(self.cpus), "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"]
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *common, *_node_ports()], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> "LocalCluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start(["--head", "--port", str(self.gcs_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port())], "head")
        try:
            self._wait_nodes(1, 120)
            for i in range(1, self.nodes):
                self._start(["--address", f"127.0.0.1:{self.gcs_port}"], f"node{i}")
            self._wait_nodes(self.nodes, 120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):  # worker nodes first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for i, temp in enumerate(self.temp_dirs):
            if exc and exc[0] is not None:  # keep the nodes' logs of a failed test beside its own
                shutil.copytree(Path(temp) / "session_latest" / "logs", self.log_dir / f"node{i}-logs", dirs_exist_ok=True,
                                ignore_dangling_symlinks=True)
            shutil.rmtree(temp, ignore_errors=True)

    def cli(self, *args: str, timeout: float = 120, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def alive_nodes(self) -> list[str]:
        out = self.cli("list", "nodes", "--address", self.dashboard, "--format", "json", "--filter", "state=ALIVE")
        try:
            return [n["node_id"] for n in json.loads(out.stdout)] if out.returncode == 0 else []
        except json.JSONDecodeError:  # "No resource in the cluster" while the head comes up
            return []

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < n:
            dead = [p.args[2:4] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.log_dir.glob("*.log")))
                raise RuntimeError(f"cluster did not reach {n} alive node(s) (exited: {dead})\n{logs}")
            time.sleep(2)

    def submit(self, submission_id: str, entrypoint: list[str], working_dir: Path, env_vars: dict[str, str],
               timeout_s: float = 600) -> str:
        """`ray job submit --working-dir` as a user runs it: the CLI follows the job's logs until it
        ends (no polling), then `ray job status` names the terminal state, which is returned."""
        runtime_env = json.dumps({"env_vars": env_vars})
        try:
            out = self.cli("job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                           "--working-dir", str(working_dir), "--runtime-env-json", runtime_env, "--", *entrypoint,
                           cwd=working_dir, timeout=timeout_s)
            (self.log_dir / f"job-{submission_id}.log").write_text(out.stdout + out.stderr)
        except subprocess.TimeoutExpired:
            self.cli("job", "stop", "--address", self.dashboard, submission_id)
            return "TIMEOUT"
        got = self.cli("job", "status", "--address", self.dashboard, submission_id)
        # The CLI says "Job 'ID' succeeded" / "failed" / "was stopped" / "is currently running".
        found = re.search(r"job '[^']*' (?:was )?(succeeded|failed|stopped)", got.stdout + got.stderr, re.I)
        return found.group(1).upper() if found else f"UNKNOWN: {got.stdout + got.stderr}"

    def job_logs(self, submission_id: str) -> str:
        return (self.log_dir / f"job-{submission_id}.log").read_text()
