"""The Ray Serve application: an HTTP ingress and an LLM deployment (one vLLM engine per replica).

    topology split (what several LLM replicas, autoscaling or several ingress replicas need):
    OpenAIIngress (FastAPI: auth, parsing, `model` resolution, metrics)
        └── handle.options(multiplexed_model_id="name@vN") ──▶ LLMServer (vLLM + adapter residency)

    topology single (the default otherwise, `auto`): LLMServer serves the same routes itself
    (one replica, one hop less per request and per streamed chunk)

Requests for an adapter carry its exact version as the multiplexed model id, so Serve prefers a
replica that already has it loaded. This module is what runs inside Serve; the entry points
that start it are elsewhere:

    rayllm serve CONFIG                        → deploy.run(cfg): starts (or joins) Ray, deploys, blocks
    python jobs/deploy.py CONFIG               → deploy.deploy(cfg) on a running cluster, returns the URL
    serve run serve_configs/smollm2.yaml       → build_app(args) with args {config: path} or
                                                 inline {serve: {...}, registry: {...}}
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ray import serve

from rayllm.config import RayllmConfig, ServeConfig, load_config, parse_config
from rayllm.config.serve import is_loopback
from rayllm.serve.auth import Keys
from rayllm.serve.protocol import AdapterSpec, Kind
from rayllm.serve.server import LocalBackend
from rayllm.storage import is_uri

logger = logging.getLogger(__name__)


def _registry_root(path: str | None) -> str | None:
    """The registry serving reads, or None when there is none yet (serving never creates one)."""
    if not path:
        return None
    if is_uri(path):
        return path
    if not Path(path).is_dir():
        logger.warning("rayllm serve: registry %s does not exist (yet); serving folder adapters only", Path(path).resolve())
        return None
    return str(Path(path).resolve())


def servable_config(cfg: ServeConfig) -> ServeConfig:
    """Local paths resolved where the config was read (replicas may run in another working directory),
    and the base model made a plain HF folder (a .gguf file or `smollm2` is converted once, cached)."""
    from rayllm.model import resolve_base

    def fix(p: str) -> str:
        return p if is_uri(p) or not Path(p).exists() else str(Path(p).resolve())

    base = resolve_base(cfg.model)
    config = base / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("is_encoder_decoder"):
        from rayllm.config import ConfigError

        raise ConfigError("config", [f"serve.model: {base} is an encoder-decoder (seq2seq) model and vLLM serves decoder-only "
                                     "models; serve a causal LM (a seq2seq model runs with transformers' generate)"])
    return cfg.model_copy(update={"model": str(base), "adapters": {n: fix(p) for n, p in cfg.adapters.items()}})


class _LLMServer:
    """One vLLM engine and the adapters it holds (the LLM deployment's replica)."""

    async def __init__(self, serve_cfg: ServeConfig, registry_root: str | None, registry_cache_dir: str | None = None):
        from rayllm.model import base_fingerprint
        from rayllm.serve.residency import AdapterManager
        from rayllm.serve.server import LLMServerCore
        from rayllm.serve.vllm_engine import VLLMEngine

        self.cfg = cfg = ServeConfig.model_validate(serve_cfg)
        engine = VLLMEngine(cfg)
        await engine.start()
        stage = cfg.stage_dir or tempfile.mkdtemp(prefix="rayllm-adapters-")
        adapters = AdapterManager(engine, slots=cfg.max_cpu_loras, max_rank=cfg.max_lora_rank,
                                  base_fingerprint=base_fingerprint(cfg.model), stage_dir=stage,
                                  registry_cache_dir=registry_cache_dir, drain_timeout_s=cfg.drain_timeout_s)
        self.core = LLMServerCore(engine, adapters)

        async def routing_token(model_id: str) -> str:
            return model_id  # residency is AdapterManager's; this only tells Serve's router what is loaded

        self._affinity = serve.multiplexed(max_num_models_per_replica=cfg.max_cpu_loras)(routing_token)
        self.catalog = catalog_for(cfg, registry_root)
        for ref in cfg.preload_adapters:
            spec = await self.catalog.resolve(ref)
            if spec is not None:
                await adapters.load(spec)

    async def generate(self, kind: Kind, request: Any, spec: AdapterSpec | None):
        if spec is not None:
            await self._affinity(spec.name)
        async for item in self.core.generate(kind, request, spec):
            yield item

    async def load(self, spec: AdapterSpec) -> None:
        await self._affinity(spec.name)
        await self.core.adapters.load(spec)

    async def unload(self, name: str) -> None:
        await self.core.adapters.unload(name)

    async def health(self) -> None:
        await self.core.engine.check_health()

    async def check_health(self) -> None:  # Serve's replica health check
        await self.core.engine.check_health()

    async def __del__(self):
        await self.core.engine.shutdown()


class _LLMServerWithRoutes(_LLMServer):
    """topology `single`: the LLM replica serves the HTTP routes itself (no ingress hop)."""

    async def __init__(self, serve_cfg: ServeConfig, registry_root: str | None, registry_cache_dir: str | None = None):
        await _LLMServer.__init__(self, serve_cfg, registry_root, registry_cache_dir)
        self.front = _frontend(self.cfg, self.catalog, LocalBackend(self.core))

    def __serve_build_asgi_app__(self):
        from rayllm.serve.openai_routes import build_app as build_routes

        return build_routes(self.front)


def catalog_for(cfg: ServeConfig, registry_root: str | None) -> Any:
    from rayllm.serve.adapters import AdapterCatalog
    from rayllm.serve.runtime_adapters import RuntimeAdapters

    runtime = RuntimeAdapters(Path(cfg.state_dir) / f"{cfg.app_name}.adapters.json" if cfg.state_dir else None)
    return AdapterCatalog(cfg.served_model_name, cfg.adapters, registry_root, cfg.registry_refresh_s,
                          cache_size=cfg.limits.model_cache_size, names_ttl_s=cfg.limits.unknown_model_cache_s,
                          runtime=runtime, lora_roots=tuple(cfg.lora_roots))


def _frontend(cfg: ServeConfig, catalog: Any, backend: Any) -> Any:
    from rayllm.serve.metrics import ServeMetrics
    from rayllm.serve.openai_routes import Frontend

    return Frontend(catalog=catalog, backend=backend, keys=Keys.from_config(cfg.api_keys, cfg.admin_key, tenants=cfg.tenants),
                    metrics=ServeMetrics(mirror_to_ray=True), playground=cfg.playground, limits=cfg.limits,
                    max_model_len=cfg.max_model_len, lora_roots=tuple(cfg.lora_roots))


LLMServer = serve.deployment(name="LLMServer")(_LLMServer)
LLMServerWithRoutes = serve.deployment(name="LLMServer")(serve.ingress()(_LLMServerWithRoutes))


class HandleBackend:
    """`protocol.Backend` over the LLMServer handle (errors come back as items, not exceptions)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def generate(self, kind: Kind, request: Any, spec: AdapterSpec | None):
        handle = self.handle.options(stream=True, multiplexed_model_id=spec.name if spec else "")
        return handle.generate.remote(kind, request, spec)

    async def load(self, spec: AdapterSpec) -> None:
        await self._unwrap(self.handle.options(multiplexed_model_id=spec.name).load.remote(spec))

    async def unload(self, name: str) -> None:
        # One replica per call: with several LLM replicas the others drop it by LRU (documented limit).
        await self._unwrap(self.handle.unload.remote(name))

    async def check_health(self) -> None:
        await self._unwrap(self.handle.health.remote())

    @staticmethod
    async def _unwrap(response: Any) -> Any:
        from ray.exceptions import RayTaskError

        from rayllm.serve.errors import ServeError

        try:
            return await response
        except RayTaskError as e:  # a ServeError raised in the replica keeps its status
            cause = getattr(e, "cause", None)
            if isinstance(cause, ServeError):
                raise cause from None
            raise


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, llm: Any, serve_cfg: ServeConfig, registry_root: str | None):
        cfg = ServeConfig.model_validate(serve_cfg)
        catalog = catalog_for(cfg, registry_root)
        self.front = _frontend(cfg, catalog, HandleBackend(llm))

    def __serve_build_asgi_app__(self):
        from rayllm.serve.openai_routes import build_app as build_routes

        return build_routes(self.front)


def queue_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's queue bound for a deployment: beyond it a caller gets 503 with Retry-After (the proxy
    answers so itself; the ingress turns the LLM handle's BackPressureError into the same, as JSON)."""
    from ray.serve.config import BackpressureConfig

    return {"max_queued_requests": cfg.limits.max_queued_requests,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.limits.retry_after_s)}


def replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """Replica count (fixed, or Serve's autoscaling), admission limit and queue bound of the LLM deployment."""
    out: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests, **queue_options(cfg)}
    if cfg.autoscaling is None:
        out["num_replicas"] = cfg.num_replicas
    else:
        # serve.autoscaling's keys are Serve's own autoscaling_config keys, passed as they are
        out["autoscaling_config"] = {**cfg.autoscaling.model_dump(), "initial_replicas": max(cfg.autoscaling.min_replicas, 1)}
    return out


def build_application(cfg: ServeConfig, registry_path: str | None, registry_cache_dir: str | None = None):
    """The bound application for a validated config.

    Replicas keep verified copies of versions from a remote registry in serve.stage_dir when it is
    set, else in `registry_cache_dir` (registry.cache_dir), which outlives the replicas' temporary
    stage folders, so a restart does not download every version again.
    """
    cfg = servable_config(cfg)
    # One record of runtime-loaded adapters per deploy, fixed in the replicas' arguments: a restarted
    # replica reads the same one, a new deploy starts from the config again.
    state = str(Path(cfg.state_dir).expanduser().resolve()) if cfg.state_dir else tempfile.mkdtemp(prefix="rayllm-serve-state-")
    cfg = cfg.model_copy(update={"state_dir": state})
    root = _registry_root(registry_path)
    cache = None if cfg.stage_dir or not registry_cache_dir else str(Path(registry_cache_dir).expanduser().resolve())
    if cfg.allow_unauthenticated and not is_loopback(cfg.host) and not Keys.from_config(cfg.api_keys, None, tenants=cfg.tenants).guarded:
        logger.warning("rayllm serve: /v1/* on %s is open to anyone who reaches it (serve.allow_unauthenticated: true, "
                       "no API keys)", cfg.host)
    resources = {"num_cpus": cfg.replica_cpus, **({"num_gpus": cfg.replica_gpus} if cfg.replica_gpus else {})}
    if cfg.effective_topology == "single":
        return LLMServerWithRoutes.options(
            num_replicas=1, max_ongoing_requests=cfg.max_ongoing_requests, ray_actor_options=resources, **queue_options(cfg),
        ).bind(cfg, root, cache)  # the validated object itself (pickled): a dump would leave out the API keys
    llm = LLMServer.options(**replica_options(cfg), ray_actor_options=resources).bind(cfg, root, cache)
    most = cfg.autoscaling.max_replicas if cfg.autoscaling else cfg.num_replicas
    return OpenAIIngress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests * most,
        ray_actor_options={"num_cpus": 0.1}, **queue_options(cfg),
    ).bind(llm, cfg, root)


def _config_from_args(args: dict[str, Any]) -> RayllmConfig:
    args = dict(args or {})
    if "config" in args:
        path = args.pop("config")
        if args:
            raise ValueError(f"build_app args: give either `config: PATH` or inline sections, not both (got {sorted(args)})")
        cfg = load_config(path)
    else:
        cfg = parse_config(args, "serve application args")
    if cfg.serve is None:
        raise ValueError("build_app args: a `serve` section is required")
    return cfg


def build_app(args: dict[str, Any]):
    """`import_path: rayllm.serve.app:build_app` in a Serve config file."""
    cfg = _config_from_args(args)
    return build_application(cfg.serve, cfg.registry.path, cfg.registry.cache_dir)
