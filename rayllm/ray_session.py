"""Joining a Ray cluster, or starting an embedded local one, for the length of a stage."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> Iterator[None]:
    """`address` (or RAY_ADDRESS) joins that cluster; otherwise a private local Ray is started
    and shut down at the end. "local" is explicit so a cluster started earlier on this machine
    with `ray start` is not joined by accident. Sweeps ask for the dashboard: without it, trials
    stopped early by ASHA leave their placement groups behind."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
