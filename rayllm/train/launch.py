"""`rayllm train` and `rayllm plan`: preflight and memory plan on the driver, then one Ray Train
TorchTrainer (trainer.py) whose workers run `worker.train_func` with DeepSpeed. Rerunning the same
config resumes the run (Ray Train V2: same RunConfig name and storage path); a finished run is
returned as it is."""

from __future__ import annotations

import time

from rayllm.config import ConfigError, config_hash
from rayllm.train.preflight import describe, preflight
from rayllm.train.trainer import build_trainer, prepare_run


def plan_main(cfg) -> int:
    """`rayllm plan CONFIG`: print the memory plan; 0 when it fits, 1 when not, 2 on config errors."""
    try:
        pre = preflight(cfg)
    except ConfigError as exc:
        print(exc)
        return 2
    print(describe(pre, cfg, with_deepspeed=True))
    return 0 if pre.fits else 1


def run(cfg, address: str | None = None) -> dict:
    """`rayllm train CONFIG`: train (or resume) the run and return its result.json as a dict."""
    from rayllm import console
    from rayllm.ray_session import ray_session

    out, t = console.get(), cfg.train
    pre, run = prepare_run(cfg, address=address)
    plan = describe(pre, cfg)
    print(plan)
    result = run.read_json("result.json")
    if result and result.get("status") == "finished" and result.get("config_hash") == config_hash(cfg):
        out.say(f"train {t.run_name}: {run.location} already finished; delete it to train again")
        return result
    out.say(f"train {t.run_name}: {plan.splitlines()[0]}")
    started = time.time()
    with ray_session(address), console.train_progress(f"train {t.run_name}", run.local / "metrics.jsonl", t.max_steps):
        fit = build_trainer(cfg, pre, run).fit()
    result = run.read_json("result.json") or {"status": "unknown"}
    result["checkpoint"] = fit.checkpoint.path if fit.checkpoint else None
    out.say(f"train {t.run_name}: {summary(result, run.location)} in {time.time() - started:.0f} s")
    return result


def summary(result: dict, location: str) -> str:
    """What a finished run left and where, in one line."""
    figures = [f"{k.replace('_', ' ')} {result[k]:.4f}" for k in ("val_loss", "val_ppl") if isinstance(result.get(k), (int, float))]
    made = result.get("adapter_dir") or result.get("model_dir")
    return (f"{result.get('status')}" + (f", {', '.join(figures)}" if figures else "")
            + (f"; {'adapter' if result.get('adapter_dir') else 'model'} {made}" if made else "")
            + f"; run folder {location} (metrics.jsonl, report.html)")
