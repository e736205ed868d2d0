"""A real Ray Tune + ASHA sweep over the Ray Train + DeepSpeed trainer, with publish and resume."""

import csv
import json

import pytest

from rayllm.config import parse_config
from tests.ray.train_fixtures import make_dataset, ray_local, tiny_config  # noqa: F401

pytestmark = [pytest.mark.slow]


def interrupt_after_first_trial(trials_dir):
    """A Tune stopper that ends the whole sweep once one trial has finished: a sweep cut off mid-way."""
    from ray import tune

    class _Interrupt(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return any(trials_dir.glob("*/result.json"))

    return _Interrupt()


def _base_model(tmp_path, dataset):
    from rayllm.config import ModelConfig
    from rayllm.model import build_model, load_tokenizer

    tok = load_tokenizer(dataset / "tokenizer")
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128), tok, "float32", seed=0)
    out = tmp_path / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.timeout(900)
def test_sweep_asha_publish_promote_and_resume(ray_local, tmp_path):
    from rayllm.registry import Registry
    from rayllm.tune.sweep import run

    dataset = make_dataset(tmp_path / "data", seq_len=32, n_docs=200, val_docs=60)
    raw = tiny_config(dataset, tmp_path / "unused", max_steps=12, eval_every=3, save_every=6, eval_batches=1,
                      warmup_steps=0, logging_steps=3, learning_rate=1e-3)
    raw["model"] = {"path": str(_base_model(tmp_path, dataset)), "dtype": "float32", "lora": {"rank": 4, "alpha": 16}}
    raw["tune"] = {"learning_rate": {"type": "grid", "values": [2e-2, 1e-6, 3e-3]}, "grace_period": 3, "reduction_factor": 2,
                   "max_concurrent_trials": 1, "output_dir": str(tmp_path / "sweeps"), "name": "lr",
                   "publish_as": "tiny", "promote_alias": "prod"}
    raw["registry"] = {"path": str(tmp_path / "registry")}
    cfg = parse_config(raw)

    trials = tmp_path / "sweeps" / "lr" / "trials"
    summary = run(cfg)
    rows = list(csv.DictReader((tmp_path / "sweeps" / "lr" / "results.csv").open()))
    assert len(rows) == 3 and summary["trials"] == 3
    by_lr = {float(r["learning_rate"]): r for r in rows}
    assert by_lr[1e-6]["stopped_early"] == "True" and int(by_lr[1e-6]["steps"]) < 12  # ASHA stopped the weak trial
    finished = [r for r in rows if r["status"] == "finished"]
    best = min(finished, key=lambda r: float(r["best_val_loss"]))
    assert summary["best"] == best["trial"]
    assert (tmp_path / "sweeps" / "lr" / "val_loss.png").stat().st_size > 1000

    reg = Registry(str(tmp_path / "registry"))
    assert summary["published"] == "tiny@v1" and summary["promoted"] is True
    resolved = reg.resolve("tiny:prod")
    assert resolved.version == 1 and resolved.manifest["metrics"]["val_loss"] == pytest.approx(float(best["best_val_loss"]))
    assert resolved.manifest["rank"] == 4

    # The same command again restores the finished sweep: nothing is trained or published twice.
    mtimes = {p: p.stat().st_mtime for p in trials.glob("*/result.json")}
    again = run(cfg)
    assert {p: p.stat().st_mtime for p in trials.glob("*/result.json")} == mtimes
    assert again["published"] == "tiny@v1" and again["best"] == summary["best"]
    assert reg.versions("tiny") == [1]
