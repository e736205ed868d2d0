"""`rayllm sweep`: a Ray Tune sweep whose every trial is the real Ray Train + DeepSpeed run.

Ray Train V2 cannot be wrapped as `Tuner(TorchTrainer)`, so each trial is a small function that
builds the trial's config, builds the same TorchTrainer `rayllm train` builds, and fits it with
Tune's report callback: validation losses flow to ASHA, which stops weak trials early. The
trial's own driver is idle, so it holds a token 0.01 CPU; the trainer's workers hold what the train
section asks for, which bounds how many trials run at once. The base config reaches trials through
`tune.with_parameters`, so Tune's param_space (and its progress table) holds only searched values.

Rerunning the same command resumes an interrupted sweep (`Tuner.restore`): finished trials are kept,
a trial that was running resumes its own Ray Train checkpoint, and grid points not yet started
run. That holds for a driver that died (killed, node lost) or was stopped with Ctrl-C: Tune's
searcher state on disk then still has the rest of the grid. A Tune `Stopper` whose `stop_all()`
fires is no interruption: Tune marks the searcher finished and the cut trials TERMINATED, and
`Tuner.restore` keeps both, so the rest of the grid would never run; hence no stopper here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rayllm import console
from rayllm.config import ConfigError, RayllmConfig, config_hash, parse_config
from rayllm.tune.report import TrialRow, best_trial, plot, table, write_csv
from rayllm.tune.space import check_sweep, fingerprint, grid_size, metric_mode, param_space, trial_config


def _trial(params: dict[str, Any], *, base: dict[str, Any], trials_dir: str, group: str) -> None:
    """The Tune trainable: one trial = one full training run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayllm.train.trainer import build_trainer, prepare_run

    trial_id = tune.get_context().get_trial_id()
    # The run folder is named by the trial id, which Tune also reports, so results find it.
    cfg = parse_config(trial_config(base, params, trial_id, trials_dir, group))
    done = Path(trials_dir) / trial_id / "result.json"
    if _finished(done, cfg):
        # Tune snapshots its state every ~10 s: a driver that died just after this run finished
        # leaves it RUNNING in the snapshot, and the restored trial lands here. Fitting again would
        # only rewrite the run; Tune restarts the trial's results, so its reports are sent again.
        print(f"sweep: {trial_id} already finished ({done}); reporting its evaluations again")
        for metrics in _reports(done.parent / "metrics.jsonl"):
            tune.report(metrics)
        return
    pre, run_dir = prepare_run(cfg)
    build_trainer(cfg, pre, run_dir, callbacks=[TuneReportCallback()]).fit()


def _reports(metrics_path: Path) -> list[dict[str, Any]]:
    """What a finished run reported to Ray at its evaluations (loop.maybe_eval_and_save): the step,
    its training loss and the evaluation's figures, from the run's metrics.jsonl."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}
    evals = {r["step"]: r for r in records if r.get("event") == "eval"}  # a resumed run's last record wins
    return [{"step": step, "loss": losses.get(step), **{k: v for k, v in r.items() if k not in ("event", "step", "time")}}
            for step, r in sorted(evals.items())]


def _finished(done: Path, cfg: RayllmConfig) -> bool:
    if not done.is_file():
        return False
    result = json.loads(done.read_text())
    return result.get("status") == "finished" and result.get("config_hash") == config_hash(cfg)


def _row(result, trials_dir: Path, max_steps: int, tokens_per_step: int, metric: str = "val_loss") -> TrialRow:
    params, df = result.config, result.metrics_dataframe
    has = lambda col: df is not None and col in df and df[col].notna().any()  # noqa: E731
    curve: list[tuple[int, float]] = []
    if has("val_loss"):
        evals = df.dropna(subset=["val_loss"])
        # A trial resumed from its checkpoint reports the steps after it again: the last report wins.
        curve = sorted({int(s): float(v) for s, v in zip(evals["step"], evals["val_loss"])}.items())
    scores = [float(v) for v in df[metric].dropna()] if has(metric) else []
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
        dpo_beta=params.get("dpo_beta"),
        score=(min(scores) if metric_mode(metric) == "min" else max(scores)) if scores else None,
    )


def run(cfg: RayllmConfig, address: str | None = None) -> dict[str, Any]:
    """Run the sweep, or resume it when `tune.output_dir`/`tune.name` already holds one."""
    from rayllm.registry.gate import gate_problems

    problems = check_sweep(cfg)
    if cfg.tune.publish_as:
        problems += gate_problems(cfg.tune.promote_alias, cfg.registry.gate, cfg.tune.promote_skip_gate)
    if cfg.tune.evaluate and cfg.eval is None:
        problems.append("tune.evaluate: true needs an eval: section (dataset, generation or harness tasks; its targets "
                        "are evaluated beside the trials, e.g. the base model); add one or set tune.evaluate: false")
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
    out = Path(t.output_dir).expanduser().resolve() / t.name
    trials_dir = out / "trials"

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayllm.ray_session import ray_session
    from rayllm.tune.progress import SweepView, TrialProgress

    path = str(out / "tune")
    resuming = tune.Tuner.can_restore(path)
    _check_same_sweep(cfg, out, resuming)
    trials_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.model_dump(mode="json", exclude_none=True)
    # The same wrapping on every run: Tuner.restore checks the trainable's name against the saved one.
    trainable = tune.with_resources(  # Tune refuses an empty request; the trial's driver idles
        tune.with_parameters(_trial, base=base, trials_dir=str(trials_dir), group=t.name), {"CPU": 0.01})
    started = time.time()
    with ray_session(address, dashboard=True), console.get().progress(f"sweep {t.name}") as bar:
        TrialProgress.view = SweepView(bar, grid_size(t), cfg.train.max_steps, t.metric)
        if resuming:
            console.get().say(f"sweep {t.name}: resuming {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = ASHAScheduler(time_attr="step", reduction_factor=t.reduction_factor, stop_last_trials=False,
                                      **asha_bounds(t.grace_period, cfg.train.max_steps))
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(t),
                tune_config=tune.TuneConfig(metric=t.metric, mode=metric_mode(t.metric), scheduler=scheduler,
                                            num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials),
                run_config=tune.RunConfig(name="tune", storage_path=str(out), callbacks=[TrialProgress()]),
            )
        try:
            grid = tuner.fit()
        finally:
            TrialProgress.view = None
    # Tune returns normally after Ctrl-C, with the cut trials TERMINATED in the grid it hands back;
    # its saved state (what a rerun restores) still has them unfinished. Rank only a whole grid.
    saved = tune.ExperimentAnalysis(path).trials
    done, expected = sum(trial.status in ("TERMINATED", "ERROR") for trial in saved), grid_size(t)
    if done < expected:
        console.get().say(f"sweep {t.name}: interrupted with {done} of {expected} trials done; run the same command again to resume")
        raise KeyboardInterrupt(f"sweep {out} interrupted")
    return summarize(cfg, grid, trials_dir, out, time.time() - started, address)


def asha_bounds(grace_period: int, max_steps: int) -> dict[str, int]:
    """ASHA's grace_period and max_t such that no rung falls on a trial's last step: a trial stopped
    there is cut off while it exports its adapter and writes result.json, and its result is lost.
    Rungs are grace_period × reduction_factor^k <= max_t; a grace period of max_steps or more means no
    early stopping, so the rungs go past the last step."""
    if grace_period < max_steps:
        return {"grace_period": grace_period, "max_t": max_steps - 1}
    return {"grace_period": max_steps + 1, "max_t": max_steps + 1}


def _check_same_sweep(cfg: RayllmConfig, out: Path, resuming: bool) -> None:
    """A rerun resumes the sweep it names; with other model/train/tune settings that would mix two
    sweeps in one, so it is refused before Ray starts."""
    record = out / "sweep.json"
    mine = fingerprint(cfg)
    if resuming and record.is_file():
        theirs = json.loads(record.read_text()).get("fingerprint")
        if theirs != mine:
            raise ConfigError("config", [f"tune.name: {out} holds a sweep started with other model/train/tune settings "
                                         f"(fingerprint {theirs}, this config {mine}); rerun it with the config it was "
                                         "started with, or choose a new tune.name"])
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"fingerprint": mine}, indent=2))


def summarize(cfg: RayllmConfig, grid, trials_dir: Path, out: Path, wall: float, address: str | None = None) -> dict[str, Any]:
    manifest = json.loads((Path(cfg.train.dataset) / "manifest.json").read_text())
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * t.num_workers * manifest["seq_len"]
    rows = [_row(r, trials_dir, t.max_steps, tokens_per_step, cfg.tune.metric) for r in grid]
    rows.sort(key=lambda r: r.learning_rate)
    best = best_trial(rows, metric_mode(cfg.tune.metric))
    evaluation = evaluate_trials(cfg, rows, out, address) if cfg.tune.evaluate else None
    write_csv(rows, out / "results.csv")
    plot(rows, best, out / "val_loss.png")
    console.get().echo(table(rows, best, cfg.tune.metric))
    summary: dict[str, Any] = {"sweep_dir": str(out), "results_csv": str(out / "results.csv"), "plot": str(out / "val_loss.png"),
                               "trials": len(rows), "stopped_early": sum(r.stopped_early for r in rows), "wall_s": round(wall, 1),
                               "best": best.trial if best else None, "best_val_loss": best.best_val_loss if best else None,
                               "metric": cfg.tune.metric, "best_score": best.score if best else None}
    if evaluation:
        summary["eval_report"] = evaluation
    if best and cfg.tune.publish_as:
        summary.update(publish_best(cfg, best, evaluation))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from rayllm.report import build

    build(out)
    console.get().say(f"sweep {cfg.tune.name}: {len(rows)} trials ({summary['stopped_early']} stopped early) in {wall:.0f} s; "
                      f"results in {out} (results.csv, val_loss.png, summary.json, report.html)")
    return summary


def evaluate_trials(cfg: RayllmConfig, rows: list[TrialRow], out: Path, address: str | None) -> str | None:
    """`rayllm eval` with the config's eval: section over every finished trial's adapter (label: the trial
    id) beside the section's own targets, on the same data; each row gets its figures. Returns the report path."""
    from rayllm.eval.run import run as run_eval

    done = [r for r in rows if r.status == "finished" and r.adapter_dir]
    if not done:
        return None
    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["eval"].update(output_dir=str(out), name="eval",
                       targets=[*raw["eval"]["targets"], *({"path": r.adapter_dir, "label": r.trial} for r in done)],
                       record_in_registry=False)  # the best trial's figures are recorded once it is published
    report = run_eval(parse_config(raw), address)
    for r in done:
        r.eval = {k: v for k, v in report["metrics"].get(r.trial, {}).items() if isinstance(v, (int, float))}
    return str(out / "eval" / "eval.json")


def publish_best(cfg: RayllmConfig, best: TrialRow, evaluation: str | None = None) -> dict[str, Any]:
    from rayllm.registry import AdapterRef, Registry, RegistryError
    from rayllm.registry import gate
    from rayllm.registry.promotion import promote_if_better

    if not best.adapter_dir:
        console.get().say(f"sweep: best trial {best.trial} left no adapter; nothing published")
        return {"published": None}
    registry = Registry(cfg.registry.path)
    name = cfg.tune.publish_as
    train = cfg.train.model_dump(mode="json")
    already = [a.ref for a, _ in registry.list(name)] if name in registry.names() else []
    same = [r for r in already if registry.show(r).get("manifest", {}).get("source_run") == best.trial]
    if same:  # a rerun of a finished sweep publishes nothing twice
        ref = same[-1]
        console.get().say(f"sweep: {best.trial} is already published as {ref}")
    else:
        # val_loss/val_ppl stay the adapter folder's own: the figure of the exported (final) weights,
        # which is what the promotion gate measures again through the endpoint. The trial's best
        # evaluation on the way may have been an earlier step's weights.
        metrics = {"best_val_loss": best.best_val_loss, "learning_rate": best.learning_rate}
        if (n := gate.trainer_sequences(train, cfg.train.dataset)) is not None:
            metrics["val_sequences"] = n
        ref = registry.publish(name, best.adapter_dir, metrics=metrics, source_run=best.trial)
        console.get().say(f"sweep: published {best.trial} as {ref}")
        if evaluation and best.eval:  # as `rayllm eval` records a registry version's figures
            from datetime import datetime, timezone

            registry.record(ref, "eval", f"sweep-{cfg.tune.name}", {"metrics": best.eval, "report": evaluation,
                                                                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    out: dict[str, Any] = {"published": ref, "promoted": False}
    if cfg.tune.promote_alias:
        version = AdapterRef.parse(ref).version
        alias = AdapterRef.of_alias(cfg.tune.publish_as, cfg.tune.promote_alias)
        move = lambda a, v: gate.promote(registry, a, v, cfg.registry.gate, skip=cfg.tune.promote_skip_gate,  # noqa: E731
                                         by=f"sweep {cfg.tune.name}", train=train, say=console.get().say)
        try:
            out["promoted"] = promote_if_better(registry, cfg.tune.publish_as, cfg.tune.promote_alias, version,
                                                metric=cfg.tune.metric, margin=cfg.tune.promote_margin,
                                                lower_is_better=metric_mode(cfg.tune.metric) == "min", move=move)
        except gate.GateRefused as e:  # the sweep's results stand; production stays where it was
            console.get().say(f"sweep: {alias} kept: {e}")
            out["gate"] = e.verdict.to_json()
            return out
        except RegistryError as e:
            console.get().say(f"sweep: {alias} kept: {e}")
            out["gate_error"] = str(e)
            return out
        skipped = " (gate skipped: tune.promote_skip_gate)" if cfg.tune.promote_skip_gate else ""
        console.get().say(f"sweep: {alias} → {ref}{skipped}" if out["promoted"]
              else f"sweep: {alias} kept (the new version is not better by {cfg.tune.promote_margin})")
    return out

