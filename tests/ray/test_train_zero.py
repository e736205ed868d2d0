"""Real Ray Train + DeepSpeed on 2 CPU workers with a tiny Llama: every ZeRO stage trains, CPU offload
runs, evaluation and checkpoints are reported, the ZeRO-3 shards merge into an HF folder, and an
injected loss spike is rolled back."""

import json
import math
import os

import pytest
import torch

from rayllm.dtypes import resolve_dtype
from tests.ray.train_fixtures import read_metrics, step_losses, tiny_config, tiny_dataset, train, wandb_history  # noqa: F401

pytestmark = pytest.mark.slow

VARIANTS = {
    "zero1-auto-dtype": {"zero_stage": 1, "model": {"dtype": "auto"}},
    # ...and reports to W&B (offline) besides metrics.jsonl, as `report_to: [jsonl, wandb]` does in a real run
    "zero2-offload-optimizer": {"zero_stage": 2, "offload_optimizer": "cpu", "report_to": ["jsonl", "wandb"]},
    "zero3-offload-all": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_zero_stage_trains_and_hands_on_a_model(ray_local, tiny_dataset, tmp_path, name):
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(tiny_dataset, tmp_path, run_name=name, save_every=4, keep_last=2, **VARIANTS[name]))
    run_dir = tmp_path / name
    losses = step_losses(run_dir)
    assert result["status"] == "finished" and sorted(losses) == list(range(1, 13))
    expected_dtype = resolve_dtype(VARIANTS[name].get("model", {}).get("dtype", "float32"), use_gpu=False)
    assert result["dtype"] == expected_dtype, "auto picks bf16 only where the CPU has it"
    assert losses[12] < losses[1] - 1.0, f"loss did not fall: {losses}"
    start = next(m for m in read_metrics(run_dir) if m.get("event") == "start")
    cores = sorted(os.sched_getaffinity(0))
    assert start["cores"] == (cores[: len(cores) // 2] if len(cores) >= 2 else None), "rank 0 pinned to its half of the cores"
    evals = [m for m in read_metrics(run_dir) if m.get("event") == "eval"]
    assert [e["step"] for e in evals] == [4, 6, 8, 12] and math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]))
    assert result["val_loss"] == evals[-1]["val_loss"] < evals[0]["val_loss"]
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_0000008", "checkpoint_0000012"], "keep_last=2 of the saves at 4, 8, 12"
    assert (run_dir / "loss_curve.png").stat().st_size > 1000 and json.loads((run_dir / "result.json").read_text())["step"] == 12
    assert "Training run" in (run_dir / "report.html").read_text()  # rank 0 wrote the page beside result.json
    if "wandb" in VARIANTS[name].get("report_to", []):
        history = {row["_step"]: row for row in wandb_history(run_dir) if "loss" in row}
        assert sorted(history) == list(range(1, 13)), "every step's metrics reached the W&B run"
        assert all(history[s]["loss"] == pytest.approx(losses[s]) for s in history)
        assert [row["val_loss"] for row in wandb_history(run_dir) if "val_loss" in row][-1] == pytest.approx(result["val_loss"])
    model = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    if name.startswith("zero3"):
        # The sharded ZeRO-3 checkpoint merges offline into the same weights the run exported.
        from rayllm.train.export import checkpoint_to_hf

        merged = AutoModelForCausalLM.from_pretrained(checkpoint_to_hf(run_dir / "checkpoint_0000012", tmp_path / "merged"))
        for (k, a), b in zip(model.state_dict().items(), merged.state_dict().values()):
            torch.testing.assert_close(a, b, msg=k)


@pytest.mark.timeout(240)
def test_injected_spike_rolls_back_lowers_lr_and_finishes(ray_local, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLLM_INJECT_SPIKE_AT_STEP", "9")  # step 9's loss becomes NaN through backward
    result = train(tiny_config(tiny_dataset, tmp_path, run_name="spike", max_steps=14, save_every=4, eval_every=4,
                               spike={"lr_factor": 0.5}))
    records = read_metrics(tmp_path / "spike")
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert result["status"] == "finished" and result["rollbacks"] == 1 and len(rollbacks) == 1
    rb = rollbacks[0]
    assert rb["step"] == 9 and rb["restored_step"] == 8 and rb["skipped_batches"] == 1 and "nan" in rb["reason"]
    after = [r for r in records if r.get("step", 0) >= 9 and "loss" in r and "event" not in r]
    assert all(math.isfinite(r["loss"]) for r in after), "the restored weights are clean"
    assert after[0]["cursor"] == 10, "the offending batch is skipped"
    # The same schedule at half the peak: the LR logged at a step is peak × schedule(step).
    from rayllm.config import TrainConfig
    from rayllm.train.schedule import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    schedule = build_scheduler(TrainConfig(dataset="d", warmup_steps=2, max_steps=14), opt).lr_lambdas[0]
    assert after[0]["lr"] == pytest.approx(0.5 * 3e-3 * schedule(9))
    assert [r for r in records if r.get("step") == 8 and "lr" in r][-1]["lr"] == pytest.approx(3e-3 * schedule(8))
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 5.0
