"""`rayllm sweep`: a Ray Tune sweep whose every trial is the real Ray Train + DeepSpeed run.

Ray Train V2 cannot be wrapped as `Tuner(TorchTrainer)`, so each trial is a small function that
builds the trial's config, builds the same TorchTrainer `rayllm train` builds, and fits it with
Tune's report callback: validation losses flow to ASHA, which stops weak trials early. The
trial's own driver is idle, so it holds a token 0.01 CPU; the trainer's workers hold what the train
section asks for, which bounds how many trials run at once. Rerunning the same command resumes
an interrupted sweep (`Tuner.restore`), and each resumed trial resumes its own checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rayllm.config import ConfigError, RayllmConfig, parse_config
from rayllm.tune.report import TrialRow, best_trial, plot, table, write_csv
from rayllm.tune.space import check_sweep, param_space, trial_config


def _trial(params: dict[str, Any]) -> None:
    """The Tune trainable: one trial = one full training run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayllm.train.trainer import build_trainer, prepare_run

    ctx = tune.get_context()
    # The run folder is named by the trial id, which Tune also reports, so results find it.
    cfg = parse_config(trial_config(params["base"], params, ctx.get_trial_id(), params["trials_dir"], params["group"]))
    pre, run_dir = prepare_run(cfg)
    build_trainer(cfg, pre, run_dir, callbacks=[TuneReportCallback()]).fit()


def _row(result, trials_dir: Path, max_steps: int, tokens_per_step: int) -> TrialRow:
    params, df = result.config, result.metrics_dataframe
    has = lambda col: df is not None and col in df and df[col].notna().any()  # noqa: E731
    curve: list[tuple[int, float]] = []
    if has("val_loss"):
        evals = df.dropna(subset=["val_loss"])
        curve = [(int(s), float(v)) for s, v in zip(evals["step"], evals["val_loss"])]
    trial_id = str(result.metrics.get("trial_id") or (df["trial_id"].iloc[-1] if has("trial_id") else ""))
    done = trials_dir / trial_id / "result.json"
    run = json.loads(done.read_text()) if trial_id and done.is_file() else {}
    steps = int(df["step"].max()) if has("step") else 0
    stopped = result.error is None and steps < max_steps
    return TrialRow(
        trial=trial_id or Path(result.path or "?").name,
        learning_rate=float(params["learning_rate"]),
        warmup_steps=params.get("warmup_steps"),
        lora_rank=params.get("lora_rank"),
        best_val_loss=min((v for _, v in curve), default=None),
        final_val_loss=curve[-1][1] if curve else None,
        perplexity=float(df["val_ppl"].dropna().iloc[-1]) if has("val_ppl") else None,
        steps=steps,
        tokens=steps * tokens_per_step,
        wall_s=round(float(df["time_total_s"].max()), 1) if has("time_total_s") else 0.0,
        stopped_early=stopped,
        status="error" if result.error else ("stopped" if stopped else run.get("status", "finished")),
        adapter_dir=run.get("adapter_dir"),
        curve=curve,
    )


def run(cfg: RayllmConfig, address: str | None = None, stop: Any = None) -> dict[str, Any]:
    """Run (or resume) the sweep; `stop` is a Tune stopper for the whole experiment (tests use it)."""
    problems = check_sweep(cfg)
    if problems:
        raise ConfigError("config", problems)
    from rayllm.train.trainer import prepare_run

    pre, _ = prepare_run(cfg, dry=True)  # the plan and data checks of `rayllm train`, before any Ray resource
    if pre.eval_micro_batches < 1:
        raise ConfigError("config", ["train.eval_batches: the val split is too small for one evaluation batch, and a "
                                     "sweep ranks trials by validation loss; prepare with a larger data.val_fraction"])
    # Checkpoints between evaluations report no val_loss; ASHA skips such results, Tune must not refuse them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    t = cfg.tune
    sweep_dir = Path(t.output_dir).expanduser().resolve()
    trials_dir = sweep_dir / t.name / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayllm.ray_session import ray_session

    base = cfg.model_dump(mode="json", exclude_none=True)
    space = {**param_space(t), "base": base, "trials_dir": str(trials_dir), "group": t.name}
    scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor)
    trainable = tune.with_resources(_trial, {"CPU": 0.01})  # Tune refuses an empty request; the driver idles
    started = time.time()
    with ray_session(address, dashboard=True):
        path = str(sweep_dir / t.name / "tune")
        if tune.Tuner.can_restore(path):
            print(f"sweep: resuming {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, param_space=space, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                            num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir / t.name), stop=stop),
            )
        grid = tuner.fit()
    return summarize(cfg, grid, trials_dir, sweep_dir / t.name, time.time() - started)


def summarize(cfg: RayllmConfig, grid, trials_dir: Path, out: Path, wall: float) -> dict[str, Any]:
    manifest = json.loads((Path(cfg.train.dataset) / "manifest.json").read_text())
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * t.num_workers * manifest["seq_len"]
    rows = [_row(r, trials_dir, t.max_steps, tokens_per_step) for r in grid]
    rows.sort(key=lambda r: r.learning_rate)
    best = best_trial(rows)
    write_csv(rows, out / "results.csv")
    plot(rows, best, out / "val_loss.png")
    print(table(rows, best))
    summary: dict[str, Any] = {"sweep_dir": str(out), "results_csv": str(out / "results.csv"), "plot": str(out / "val_loss.png"),
                               "trials": len(rows), "stopped_early": sum(r.stopped_early for r in rows), "wall_s": round(wall, 1),
                               "best": best.trial if best else None, "best_val_loss": best.best_val_loss if best else None}
    if best and cfg.tune.publish_as:
        summary.update(publish_best(cfg, best))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"sweep: results in {out} (results.csv, val_loss.png, summary.json)")
    return summary


def publish_best(cfg: RayllmConfig, best: TrialRow) -> dict[str, Any]:
    from rayllm.registry import Registry
    from rayllm.registry.resolve import promote_if_better

    if not best.adapter_dir:
        print(f"sweep: best trial {best.trial} left no adapter; nothing published")
        return {"published": None}
    registry = Registry(cfg.registry.path)
    name = cfg.tune.publish_as
    already = [a.ref for a, _ in registry.list(name)] if name in registry.names() else []
    same = [r for r in already if registry.show(r).get("manifest", {}).get("source_run") == best.trial]
    if same:  # a rerun of a finished sweep publishes nothing twice
        ref = same[-1]
        print(f"sweep: {best.trial} is already published as {ref}")
    else:
        ref = registry.publish(name, best.adapter_dir, metrics={"val_loss": best.best_val_loss, "learning_rate": best.learning_rate},
                               source_run=best.trial)
        print(f"sweep: published {best.trial} as {ref}")
    out: dict[str, Any] = {"published": ref, "promoted": False}
    if cfg.tune.promote_alias:
        version = int(ref.rsplit("@v", 1)[1])
        out["promoted"] = promote_if_better(registry, cfg.tune.publish_as, cfg.tune.promote_alias, version,
                                            metric="val_loss", margin=cfg.tune.promote_margin)
        alias = f"{cfg.tune.publish_as}:{cfg.tune.promote_alias}"
        print(f"sweep: {alias} → {ref}" if out["promoted"] else f"sweep: {alias} kept (the new version is not better by {cfg.tune.promote_margin})")
    return out
