"""`tune:` — Ray Tune learning-rate sweeps with ASHA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayllm.config.base import Section


class LearningRateSpace(Section):
    type: Literal["loguniform", "grid"] = Field("grid", description="loguniform: sampled in [low, high]; grid: every value in values.")
    low: float | None = Field(None, gt=0, description="loguniform: lowest learning rate.")
    high: float | None = Field(None, gt=0, description="loguniform: highest learning rate.")
    values: list[float] = Field(default_factory=list, description="grid: the learning rates tried.")

    @model_validator(mode="after")
    def _space(self) -> "LearningRateSpace":
        if self.type == "grid" and not self.values:
            raise ValueError("grid needs values: a list of learning rates, e.g. [1e-4, 3e-4, 1e-3]")
        if self.type == "loguniform" and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError("loguniform needs low < high, e.g. low: 1e-5, high: 1e-3")
        return self


class TuneConfig(Section):
    learning_rate: LearningRateSpace = Field(default_factory=lambda: LearningRateSpace(values=[1e-4, 3e-4, 1e-3]), description="Search space of the learning rate.")
    warmup_steps: list[int] = Field(default_factory=list, description="Grid of warmup steps (empty: train.warmup_steps).")
    lora_rank: list[int] = Field(default_factory=list, description="Grid of LoRA ranks (empty: model.lora.rank).")
    dpo_beta: list[float] = Field(default_factory=list, description="Grid of DPO betas (train.objective: dpo; empty: train.dpo.beta).")
    num_samples: int = Field(1, ge=1, description="Samples drawn from the space (per grid point).")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once; bounded by the cluster's resources too.")
    grace_period: int = Field(10, ge=1, description="ASHA: steps every trial runs before it may be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor of the trials at each rung.")
    output_dir: str = Field("runs/sweeps", description="Sweep directory root.")
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Sweep name; rerunning the same name resumes it.")
    publish_as: str | None = Field(None, description="Registry name the best trial's adapter is published under (empty: not published).")
    promote_alias: str | None = Field(None, description="Alias moved to the published version when it beats the current one.")
    evaluate: bool = Field(False, description="Evaluate every finished trial's adapter with this config's `eval:` section (its own targets stay, as baselines, beside the trials): the figures join the results table and the best trial's go into its published version's manifest.")
    promote_skip_gate: bool = Field(False, description="Promote without measuring through the endpoint (registry.gate); recorded in the alias history. Needed when promote_alias is set and registry.gate.endpoint is empty.")
    promote_margin: float = Field(0.0, ge=0, description="Promote only when tune.metric improves on the alias's version by at least this much.")
    metric: Literal["val_loss", "val_rewards/accuracies", "val_rewards/margins"] = Field(
        "val_loss", description="The validation figure trials are ranked by, ASHA stops on and promotion compares: val_loss (lower is better), or for train.objective dpo the val preference accuracy or reward margin (higher is better; needed when tune.dpo_beta sweeps several betas, whose DPO losses are not comparable).")
