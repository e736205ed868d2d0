"""Deploy the endpoint on the Ray this process is connected to, and say where it answers.

Used by `rayllm serve` (`run`: starts or joins Ray, deploys and blocks until Ctrl-C) and by
jobs/deploy.py (a driver on a running cluster that deploys and exits, leaving the application
running there). The code that runs inside Serve's replicas is app.py; this module only drives it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request

from rayllm.config import RayllmConfig


def cluster_address(address: str | None) -> str | None:
    """The running cluster a deploy-and-exit driver joins: `address`, else RAY_ADDRESS (set inside
    `ray job submit`), else None. Never an embedded Ray: it would take the endpoint down with it."""
    return address or os.environ.get("RAY_ADDRESS") or None


def endpoint(cfg: RayllmConfig) -> str:
    """The OpenAI base URL (`.../v1`) of the configured proxy."""
    s = cfg.serve
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}/v1"


def wait_healthy(url: str, timeout_s: float, app_name: str | None = None) -> None:
    """Until /health answers 200; fails early when Serve gives up on the application."""
    health = url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if app_name is not None:
            _raise_if_failed(app_name)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{health} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(2)


def binds_directly(cfg: RayllmConfig) -> bool:
    """Whether the ingress replica itself answers on serve.host:port (Serve's direct ingress) when
    rayllm starts the Ray: one ingress replica (the LLM replica under topology single) and the
    root prefix. Otherwise Serve's proxy takes serve.port and forwards every request and chunk."""
    s = cfg.serve
    one_ingress = s.effective_topology == "single" or s.ingress_replicas == 1
    return s.direct_ingress and one_ingress and s.route_prefix == "/"


def local_ray_env(cfg: RayllmConfig) -> dict[str, str]:
    """Serve settings for a Ray that `rayllm serve` starts, read by Serve's controller and replicas,
    so in the environment before Ray starts.

    With direct ingress each ingress replica runs its own HTTP server on a port Serve hands out from
    a range; a range of exactly serve.port gives the one ingress replica the endpoint's port. The
    proxy then only answers health checks on a free port. Measured on 2 cores (SmolLM2, 8 streams):
    the proxy hop cost 57 ms of time to first token and 7 % of tokens/s. A released port is not
    held back and a stopping replica drains for 2 s, not Serve's 30 (no load balancer here to take it
    out of rotation), so a restarted replica binds serve.port again.
    """
    if not cfg.serve.direct_ingress:
        return {}
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    if binds_directly(cfg):
        port = cfg.serve.port
        env.update({"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
                    "RAY_SERVE_PORT_QUARANTINE_S": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"})
    return env


def proxy_port(cfg: RayllmConfig) -> int:
    """Where Serve's proxy listens: serve.port, or a free port when the ingress replica has it."""
    from rayllm.ray_session import free_port

    if os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT") != str(cfg.serve.port) or not binds_directly(cfg):
        return cfg.serve.port
    return free_port()


def deploy(cfg: RayllmConfig, timeout_s: float = 900) -> str:
    """Start Serve (its proxy on serve.host:port, or on a free port when the ingress replica binds
    serve.port itself: `local_ray_env`), deploy (or update) the application, wait for /health.

    Returns the endpoint URL. The application lives until `serve.delete(app_name)` or the cluster
    stops. Direct ingress takes effect only where the cluster was started with
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (`rayllm serve` sets it for the Ray it starts).
    """
    from ray import serve

    from rayllm.serve.app import build_application

    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": proxy_port(cfg)})
    try:
        serve.run(build_application(s, cfg.registry.path, cfg.registry.cache_dir), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    except RuntimeError as exc:  # Serve gave up on the replicas: say why, not only that
        raise RuntimeError(f"{exc}\n{_failure_detail(s.app_name)}") from None
    url = endpoint(cfg)
    wait_healthy(url, timeout_s, s.app_name)
    return url


def undeploy(cfg: RayllmConfig) -> None:
    """Delete the application (in-flight requests finish first); stop Serve when nothing else runs on it."""
    from ray import serve

    serve.delete(cfg.serve.app_name)
    if not serve.status().applications:
        serve.shutdown()


def run(cfg: RayllmConfig, address: str | None = None) -> int:
    """`rayllm serve CONFIG`: start (or join) Ray, deploy, serve until Ctrl-C / SIGTERM, then undeploy."""
    from rayllm.ray_session import ray_session
    from rayllm.serve.app import servable_config

    if not cluster_address(address):  # seen by the Ray started here; a value already set wins
        for key, value in local_ray_env(cfg).items():
            os.environ.setdefault(key, value)
    servable_config(cfg.serve)  # a base vLLM cannot serve is refused before Ray starts
    stop = threading.Event()
    with ray_session(address):
        # After ray.init, whose own handler would abort the process on SIGTERM instead of shutting down.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(f"rayllm: serving {cfg.serve.served_model_name} at {deploy(cfg)}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        undeploy(cfg)
    return 0


def _raise_if_failed(app_name: str) -> None:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is not None and app.status == "DEPLOY_FAILED":
        raise RuntimeError(f"Serve could not deploy application {app_name!r}\n{_failure_detail(app_name)}")


def _failure_detail(app_name: str, limit: int = 400) -> str:
    """The start of the application's and its deployments' status messages (Serve cuts long
    tracebacks short; the replica's log has the rest)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return ""
    lines = [app.message] + [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return "\n".join(line if len(line) <= limit else line[:limit] + " …" for line in lines if line) + \
        "\n(the replicas' own logs: the Ray dashboard, or `ray logs` on the cluster)"
