"""`registry.gate:` — the promotion gate: a version is measured through the live endpoint before an alias moves to it."""

from __future__ import annotations

from pydantic import Field, model_validator

from rayllm.config.base import Section
from rayllm.config.eval import GenerationTask


class GateConfig(Section):
    endpoint: str | None = Field(None, description="Base URL of the OpenAI-compatible endpoint serving this registry (e.g. http://127.0.0.1:8000); the candidate is measured there as NAME@vN. Empty: no gate, so `registry promote` and a sweep's promote_alias need an explicit skip (--skip-gate, tune.promote_skip_gate).")
    api_key_env: str = Field("RAYLLM_API_KEY", description="Environment variable holding the endpoint's API key (unset or empty: no key sent).")
    tolerance: float = Field(0.01, gt=0, lt=1, description="Largest relative difference between the served validation perplexity and the trainer's own figure in the version's manifest; for a DPO version, the largest absolute difference between the served val DPO loss and the trainer's val_loss (nats per pair).")
    dataset: str | None = Field(None, description="Prepared dataset whose val split is measured; empty: the one the version was trained on (its run's config.yaml, else train.dataset of this config).")
    reference_model: str = Field("base", description="DPO versions: the endpoint's name for the base model the adapter was trained from (serve.served_model_name), whose log-probs are the DPO reference (a LoRA's reference is its base with the adapter disabled).")
    max_sequences: int | None = Field(None, ge=1, description="Cap on the val sequences measured; empty: exactly the ones the trainer's val_loss covers (a like-for-like figure). A lower cap is faster but adds sampling noise: widen tolerance with it.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of each request to the endpoint (an unreachable endpoint fails within this, not forever).")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once while measuring.")
    generation: GenerationTask | None = Field(None, description="Optional generation task (as in eval.generation) run through the endpoint for the candidate and the alias's current version; the candidate's generation_metric must not fall below the current one's by more than generation_margin.")
    generation_metric: str = Field("rougeL", description="The task metric compared (bleu, rougeL, exact_match or f1; ×100, higher is better).")
    generation_margin: float = Field(0.0, ge=0, description="Points (on the ×100 scale) the candidate may score below the alias's current version.")

    @model_validator(mode="after")
    def _metric_in_task(self) -> "GateConfig":
        if self.generation is not None and self.generation_metric not in self.generation.metrics:
            raise ValueError(f"generation_metric {self.generation_metric!r} is not among generation.metrics "
                             f"{self.generation.metrics}; add it there or choose one of them")
        return self
