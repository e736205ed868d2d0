"""Joining a Ray cluster, or starting an embedded local one, for the length of a stage."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator


# Settings for a Ray that rayllm starts on this machine, read by Ray's own processes (the raylet,
# the Train controller), so in the environment before the raylet starts; a value already set wins.
# A private local Ray is the job itself, so its workers run at the priority of the command that
# started it, as a script or DeepSpeed's launcher would: Ray's default niceness 15 for workers let
# the wake-ups of Ray's own daemons preempt the training ranks, about 3 % of training throughput
# (400-step A/B runs of `rayllm train`, 2 cores: 9,421 / 9,462 tok/s at 15 against 9,742 / 9,805 at 0).
# A one-node local Ray is never drained, so Train's preemption watcher (one more actor process per
# run) has nothing to watch; and its controller polls the workers every 2 s by default, which a
# short run (a sweep trial, the demo) waits out several times. On a cluster Ray's defaults stand.
LOCAL_RAY_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def free_port() -> int:
    """A TCP port free on this machine now (the local Ray's dashboard, a moved Serve proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> Iterator[None]:
    """`address` (or RAY_ADDRESS) joins that cluster; otherwise a private local Ray is started and
    shut down at the end. "local" is explicit so a cluster started earlier on this machine with
    `ray start` is not joined by accident.

    The local Ray gets its dashboard on a free port, and RAY_API_SERVER_ADDRESS points at it:
    Ray Train V2's placement-group cleaner asks the state API whether a run's controller lives,
    and without an address it may ask another Ray on the same machine, hear "dead" and remove a
    live run's placement group. Sweeps need the dashboard too: without it, trials stopped early
    by ASHA leave their placement groups behind."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    kwargs: dict = {"include_dashboard": False}
    if dashboard:
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    saved_env = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    os.environ.update({k: os.environ.get(k) or v for k, v in LOCAL_RAY_ENV.items()})
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
        restore_env(saved_env)
        if dashboard:
            if saved is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = saved


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as `saved` holds them (None: unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
