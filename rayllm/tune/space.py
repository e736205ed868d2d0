"""The search space of a sweep and the per-trial config it produces: pure, unit-tested."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rayllm.config.tune import TuneConfig

# Settings a rerun may change: they act after the trials (publishing) or locate the sweep.
_RERUN_FREE = {"publish_as", "promote_alias", "promote_margin", "promote_skip_gate", "output_dir", "name"}


def param_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """Ray Tune's param_space: lr (log-uniform or grid), optional warmup and LoRA-rank grids."""
    from ray import tune

    lr = tune_cfg.learning_rate
    space: dict[str, Any] = {
        "learning_rate": tune.grid_search(list(lr.values)) if lr.type == "grid" else tune.loguniform(lr.low, lr.high)
    }
    if tune_cfg.warmup_steps:
        space["warmup_steps"] = tune.grid_search(list(tune_cfg.warmup_steps))
    if tune_cfg.lora_rank:
        space["lora_rank"] = tune.grid_search(list(tune_cfg.lora_rank))
    if tune_cfg.dpo_beta:
        space["dpo_beta"] = tune.grid_search(list(tune_cfg.dpo_beta))
    return space


def grid_size(tune_cfg: TuneConfig) -> int:
    """How many trials the sweep makes: every grid combination, num_samples times."""
    n = tune_cfg.num_samples * max(len(tune_cfg.warmup_steps), 1) * max(len(tune_cfg.lora_rank), 1) * max(len(tune_cfg.dpo_beta), 1)
    return n * len(tune_cfg.learning_rate.values) if tune_cfg.learning_rate.type == "grid" else n


def fingerprint(cfg) -> str:
    """What a sweep's trials are made of: the model and train sections and the tune settings, less
    those a rerun may change. A sweep resumes only under the same fingerprint, because restored
    trials train with the config they are given now while the grid was fixed at the start."""
    made_of = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
               "tune": cfg.tune.model_dump(mode="json", exclude=_RERUN_FREE)}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_name: str, trials_dir: str, group: str) -> dict[str, Any]:
    """The full rayllm config (as plain data) of one trial: the base config with the trial's values,
    its own run folder, and the sweep's W&B group."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    train = dict(cfg["train"])
    train.update(
        learning_rate=float(params["learning_rate"]),
        output_dir=trials_dir,
        run_name=trial_name,
        wandb_group=group,
    )
    if "warmup_steps" in params:
        train["warmup_steps"] = int(params["warmup_steps"])
    if "dpo_beta" in params:
        train["dpo"] = {**dict(train.get("dpo") or {}), "beta": float(params["dpo_beta"])}
    cfg["train"] = train
    if "lora_rank" in params:
        model = dict(cfg["model"])
        lora = dict(model.get("lora") or {})
        lora["rank"] = int(params["lora_rank"])
        model["lora"] = lora
        cfg["model"] = model
    return cfg


def check_sweep(cfg) -> list[str]:
    """Problems that make a sweep config unusable, found before Ray starts."""
    problems = []
    if cfg.train is None:
        problems.append("train: a sweep runs the trainer; add a train section")
    if cfg.model is None:
        problems.append("model: a sweep runs the trainer; add a model section")
    t = cfg.tune
    if t.lora_rank and (cfg.model is None or cfg.model.lora is None):
        problems.append("tune.lora_rank: sweeping LoRA ranks needs model.lora")
    if t.publish_as and (cfg.model is None or cfg.model.lora is None):
        problems.append("tune.publish_as: only LoRA adapters are published to the registry; add model.lora or drop publish_as")
    if t.dpo_beta and (cfg.train is None or cfg.train.objective != "dpo"):
        problems.append("tune.dpo_beta: sweeping DPO's beta needs train.objective: dpo")
    if t.metric != "val_loss" and (cfg.train is None or cfg.train.objective != "dpo"):
        problems.append(f"tune.metric: {t.metric} is a DPO figure; it needs train.objective: dpo (else use val_loss)")
    if len(set(t.dpo_beta)) > 1 and t.metric == "val_loss":
        problems.append("tune.metric: DPO losses under different betas are not comparable (the loss scales with beta); "
                        "rank a beta sweep by tune.metric: val_rewards/accuracies (or val_rewards/margins)")
    if t.promote_alias and not t.publish_as:
        problems.append("tune.promote_alias: needs tune.publish_as (the name the best adapter is published under)")
    if cfg.train is not None and t.grace_period > cfg.train.max_steps:
        problems.append(f"tune.grace_period ({t.grace_period}) exceeds train.max_steps ({cfg.train.max_steps}); no trial could be stopped early")
    return problems


def metric_mode(metric: str) -> str:
    """Tune's mode for a `tune.metric`: losses go down, DPO's accuracy and margin go up."""
    return "min" if metric.endswith("loss") else "max"
