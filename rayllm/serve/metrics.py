"""Prometheus metrics per adapter and version: requests, tokens, latency, time to first token.

Recorded by the ingress (it sees every request, its resolved adapter and its usage) into a
private prometheus_client registry, served at GET /metrics; inside Ray Serve the same numbers go
to `ray.serve.metrics` too, so Ray's metrics endpoint aggregates them over replicas. Labels only
ever hold resolved names (never the raw `model` a client typed), so cardinality stays bounded.
"""

from __future__ import annotations

from typing import Any

from rayllm.registry.names import AdapterRef

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
UNRESOLVED = "unresolved"


def split_served_name(name: str | None, base_name: str) -> tuple[str, str]:
    """("support", "v3") for "support@v3", ("support", "folder") for a plain one, (base, "base")."""
    if name is None or name == base_name:
        return base_name, "base"
    if name == UNRESOLVED:
        return UNRESOLVED, ""
    ref = AdapterRef.parse(name)  # served names are refs the catalog built: name@vN, or a folder's plain name
    return ref.name, "folder" if ref.version is None else f"v{ref.version}"


class ServeMetrics:
    def __init__(self, mirror_to_ray: bool = False):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        labels = ["adapter", "version"]
        self._requests = Counter("rayllm_requests", "Requests by adapter, version, route and HTTP status.",
                                 [*labels, "route", "status"], registry=self.registry)
        self._prompt = Counter("rayllm_prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry)
        self._completion = Counter("rayllm_completion_tokens", "Completion tokens generated.", labels, registry=self.registry)
        self._latency = Histogram("rayllm_request_latency_seconds", "Request latency (to the last byte).",
                                  [*labels, "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ttft = Histogram("rayllm_time_to_first_token_seconds", "Streaming: time to the first chunk.",
                               labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ray: dict[str, Any] | None = _ray_metrics() if mirror_to_ray else None

    def observe(self, adapter: str, version: str, route: str, status: int, latency_s: float,
                usage: dict | None = None, ttft_s: float | None = None) -> None:
        tags = {"adapter": adapter, "version": version}
        self._requests.labels(adapter, version, route, str(status)).inc()
        self._latency.labels(adapter, version, route).observe(latency_s)
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        self._prompt.labels(adapter, version).inc(prompt)
        self._completion.labels(adapter, version).inc(completion)
        if ttft_s is not None:
            self._ttft.labels(adapter, version).observe(ttft_s)
        if self._ray is not None:
            self._ray["requests"].inc(1, tags={**tags, "route": route, "status": str(status)})
            self._ray["latency"].observe(latency_s, tags={**tags, "route": route})
            if prompt:
                self._ray["prompt"].inc(prompt, tags=tags)
            if completion:
                self._ray["completion"].inc(completion, tags=tags)
            if ttft_s is not None:
                self._ray["ttft"].observe(ttft_s, tags=tags)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _ray_metrics() -> dict[str, Any]:
    from ray.serve import metrics

    keys = ("adapter", "version")
    return {
        "requests": metrics.Counter("rayllm_requests", "Requests.", tag_keys=(*keys, "route", "status")),
        "prompt": metrics.Counter("rayllm_prompt_tokens", "Prompt tokens.", tag_keys=keys),
        "completion": metrics.Counter("rayllm_completion_tokens", "Completion tokens.", tag_keys=keys),
        "latency": metrics.Histogram("rayllm_request_latency_seconds", "Latency.", boundaries=list(LATENCY_BUCKETS),
                                     tag_keys=(*keys, "route")),
        "ttft": metrics.Histogram("rayllm_time_to_first_token_seconds", "TTFT.", boundaries=list(LATENCY_BUCKETS), tag_keys=keys),
    }
