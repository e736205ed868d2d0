"""`rayllm train` and `rayllm plan`: preflight and memory plan on the driver, then one Ray Train
TorchTrainer (trainer.py) whose workers run `worker.train_func` with DeepSpeed. Rerunning the same
config resumes the run (Ray Train V2: same RunConfig name and storage path); a finished run is
returned as it is."""

from __future__ import annotations

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
    from rayllm.ray_session import ray_session

    pre, run = prepare_run(cfg, address=address)
    print(describe(pre, cfg))
    result = run.read_json("result.json")
    if result and result.get("status") == "finished" and result.get("config_hash") == config_hash(cfg):
        print(f"[rayllm] {run.location} already finished; delete it to train again")
        return result
    with ray_session(address):
        fit = build_trainer(cfg, pre, run).fit()
    result = run.read_json("result.json") or {"status": "unknown"}
    result["checkpoint"] = fit.checkpoint.path if fit.checkpoint else None
    return result
