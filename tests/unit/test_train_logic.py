"""Pure training arithmetic: batching, LR schedule, DeepSpeed config, spike policy, metrics."""

import json
import math

import pytest

from rayllm.config import TrainConfig
from rayllm.train.batching import Batching, batching, check_batching, eval_micro_batches
from rayllm.train.spike import injected_steps, nan_loss_at, remember, spike_reason
from rayllm.train.zero import MAX_BUCKET, deepspeed_config


def cfg(**kw):
    return TrainConfig(dataset="d", **kw)


def test_global_batch_is_micro_times_accum_times_workers():
    b = batching(cfg(micro_batch_size=3, gradient_accumulation_steps=5, num_workers=4), seq_len=128)
    assert (b.global_batch, b.tokens_per_step) == (60, 7680)
    assert b.epochs(max_steps=10, train_sequences=600) == 1.0
    assert "global batch 60 sequences = micro 3 × accum 5 × workers 4" in b.describe(10, 600)


def test_batching_checked_against_the_dataset():
    b = Batching(4, 2, 2, 64)
    assert check_batching(b, 16, 8) == []
    text = " ".join(check_batching(b, 15, 7))
    assert "exceeds the 15 train sequences" in text and "val split has 7 sequences" in text
    assert eval_micro_batches(b, eval_batches=8, val_sequences=20) == 2
    assert eval_micro_batches(b, eval_batches=1, val_sequences=20) == 1


def test_schedule_is_transformers_warmup_then_cosine():
    import torch

    from rayllm.train.schedule import build_scheduler, rescale

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(cfg(learning_rate=1e-3, warmup_steps=4, max_steps=12), opt)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[8] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    rescale(sched, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * sched.lr_lambdas[0](sched.last_epoch) * 1e-3)
    state = sched.state_dict()
    assert state["base_lrs"] == [5e-4], "the scaled peak is part of the saved scheduler state"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    t = cfg(zero_stage=stage, micro_batch_size=2, gradient_accumulation_steps=3, num_workers=2, max_grad_norm=0.5)
    ds = deepspeed_config(t, batching(t, 64), "float32", trainable_params=10**9)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (12, 2, 3)
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    if stage:
        assert ds["zero_optimization"]["reduce_bucket_size"] == MAX_BUCKET


def test_deepspeed_config_offload_precision_and_buckets():
    t = cfg(zero_stage=3, offload_optimizer="cpu", offload_param="cpu", max_grad_norm=0)
    ds = deepspeed_config(t, batching(t, 64), "bfloat16", trainable_params=1234)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu"} and z["offload_param"] == {"device": "cpu"}
    assert ds["bf16"]["enabled"] and "gradient_clipping" not in ds and ds["zero_force_ds_cpu_optimizer"] is False
    assert z["reduce_bucket_size"] == 100_000, "small models get small buckets, not DeepSpeed's 5e8 elements"
    g = cfg(zero_stage=2, offload_optimizer="nvme", nvme_path="/nvme", use_gpu=True)
    dg = deepspeed_config(g, batching(g, 64), "bfloat16", 10**6)
    assert dg["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme", "pin_memory": True}
    assert dg["optimizer"]["params"]["torch_adam"] is False, "GPU + offload uses DeepSpeed's CPU Adam"


def test_spike_policy():
    history = [2.0, 2.1, 1.9]
    assert spike_reason(float("nan"), [], 3.0, 3).startswith("loss is nan")
    assert spike_reason(float("inf"), history, 3.0, 3)
    assert spike_reason(6.5, history, 3.0, 3) and not spike_reason(5.9, history, 3.0, 3)
    assert spike_reason(100.0, history[:2], 3.0, 3) is None, "no ratio test before the window is full"
    near_zero = [0.09, 0.1, 0.08]  # a DPO loss near convergence: noise there is no divergence
    assert spike_reason(0.37, near_zero, 3.0, 3) and not spike_reason(0.37, near_zero, 3.0, 3, floor=0.693)
    assert spike_reason(2.2, near_zero, 3.0, 3, floor=0.693)
    assert remember(history, 1.8, 3) == [2.1, 1.9, 1.8]
    assert injected_steps("5, 9") == {5, 9} and injected_steps(None) == set()


def test_injected_spike_poisons_every_micro_batch_of_its_step_once():
    class Engine:  # DeepSpeed's optimizer-step counter, all the hook reads
        global_steps = 0

    engine, calls = Engine(), []
    loss_fn = nan_loss_at(lambda e, batch, device: calls.append(batch) or 2.0, {3}, micro_batches=2)

    def step():
        losses = [loss_fn(engine, len(calls), "cpu") for _ in range(2)]
        engine.global_steps += 1
        return losses

    assert step() == [2.0, 2.0] and step() == [2.0, 2.0]
    assert all(math.isnan(x) for x in step()), "step 3: every accumulation micro-batch"
    engine.global_steps = 2  # the rollback restores step 2's checkpoint; step 3 runs again
    assert step() == [2.0, 2.0] and step() == [2.0, 2.0]


def test_metrics_log_truncates_on_resume_and_plots(tmp_path):
    from rayllm.train.metrics import MetricsLog, flops_per_token, mfu, plot_losses

    log = MetricsLog(tmp_path, True, ["jsonl"])
    for step in range(1, 6):
        log.log({"step": step, "loss": 5.0 - step * 0.1})
    log.log({"event": "eval", "step": 5, "val_loss": 4.4})
    resumed = MetricsLog(tmp_path, True, ["jsonl"], resume_step=3)
    resumed.log({"step": 4, "loss": 4.55})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 1000
    assert MetricsLog(tmp_path / "x", False, ["jsonl"]).log({"step": 1}) is None and not (tmp_path / "x").exists()
    assert flops_per_token(100, 2, 8, 16) == 600 + 12 * 2 * 8 * 16
    assert mfu(1000.0, 6e9, 1e15, 2) == pytest.approx(1000 * 6e9 / 2e15) and mfu(1.0, 1.0, None, 1) is None


def test_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    from rayllm.train.metrics import MetricsLog

    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, True, ["jsonl", "wandb"], {"project": "rayllm-test", "name": "t", "mode": "offline"})
    log.log({"step": 1, "loss": 3.0})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_ranks_on_a_node_split_its_cores_evenly_and_never_share_one():
    from rayllm.train.worker import core_share

    assert [core_share([0, 1], r, 2) for r in range(2)] == [[0], [1]]
    assert [core_share(list(range(8)), r, 3) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert core_share([2, 5, 7, 9], 1, 2) == [7, 9]  # the cores this process may use, not 0..n
    assert core_share([0, 1], 0, 1) is None  # one rank: nothing to split
    assert core_share([0, 1], 2, 3) is None  # fewer cores than ranks: no binding


def test_deepspeed_cpu_comm_does_not_build_the_shm_op(tmp_path):
    """DeepSpeed's CPU comm backend would compile its shared-memory all-reduce op at init (65 s on 2
    cores) for inference only; after `skip_shm_comm_build` it returns no op and compiles nothing."""
    import os
    import subprocess
    import sys

    code = ("from rayllm.train.worker import skip_shm_comm_build\n"
            "skip_shm_comm_build()\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "print('op', build_shm_op())\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "op None" in out.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))
