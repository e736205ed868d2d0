"""One private 2-CPU Ray for every in-process real-stack test that can share it.

Starting Ray costs 5-10 s on 2 cores; one per test module added about a minute to the suite. The
Ray starts on first use and lives until the session ends, or until a test that does not share it
runs: one that starts its own Ray (whose workers must inherit environment set inside the test, such
as the S3 endpoint), a subprocess test, or a unit test (an idle Ray still spends CPU, and unit tests
check that nothing started one). The next sharing test starts it again.

Never `ray stop`: other Rays may share the machine. Only what `ray.init` started here is shut down.
"""

from __future__ import annotations

import os
import socket

from rayllm.ray_session import LOCAL_RAY_ENV, restore_env

# Inherited by Ray's own processes (the Serve controller, replicas, Train workers): they must be in
# the environment when the raylet starts. As `rayllm serve` runs it; no load balancer to wait for.
_RAY_PROCESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    **LOCAL_RAY_ENV,  # as a Ray that rayllm starts locally
}


class SharedRay:
    def __init__(self) -> None:
        self.started = False
        self._saved_api: str | None = None

    def ensure(self) -> None:
        """Start the shared Ray unless it is running.

        Ray Train V2's PlacementGroupCleaner asks the state API whether the run's controller is
        alive, without an address: on a machine with other Ray clusters it can ask one of those,
        hear "dead", and remove our live placement group. RAY_API_SERVER_ADDRESS pointing at our
        own dashboard keeps the answer ours (it stays set while this Ray lives)."""
        import ray

        if self.started and ray.is_initialized():
            return
        if ray.is_initialized():
            raise RuntimeError("a test left its own Ray running; shared tests need it shut down first")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self._saved_api = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        saved = {k: os.environ.get(k) for k in _RAY_PROCESS_ENV}
        os.environ.update({k: os.environ.get(k, v) for k, v in _RAY_PROCESS_ENV.items()})
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, object_store_memory=256 * 2**20)
        finally:
            restore_env(saved)
        self.started = True

    def stop(self) -> None:
        import ray

        if not self.started:
            return
        self.started = False
        try:
            from ray import serve

            serve.shutdown()  # a no-op unless a test left an application running
        except Exception:
            pass
        ray.shutdown()
        restore_env({"RAY_API_SERVER_ADDRESS": self._saved_api})


SHARED = SharedRay()  # the one per test session (tests/conftest.py)
