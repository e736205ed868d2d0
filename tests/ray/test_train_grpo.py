"""GRPO on the real stack: a tiny Llama base (own tokenizer) with LoRA on 2 Ray Train workers (DeepSpeed
ZeRO-2), rollouts from one vLLM engine in a Ray actor, rewards from code. The reward is trivially
learnable (the share of digits in a completion, from a user function named by import path), so a few
iterations at a high learning rate must raise it; a second user reward raises on some completions
and must only be counted. The run's own records show each batch came from the policy version that
trained on it, and each version reached the engine under a new LoRA id. The run is stopped halfway and
the same command run again, as a user resumes: versions, LoRA ids and the prompt order go on unbroken.
In the second half the rollout actor's process is SIGKILLed: a new engine takes its place and the
run goes on with the same versions and LoRA ids.
The metrics reach W&B (offline) and report.html plots the rewards."""

import glob
import json
import os
import signal
import threading
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayllm.data.verifiable import problems
from tests.ray.train_fixtures import read_metrics, train, train_tokenizer, wandb_history

pytestmark = pytest.mark.slow
ITERATIONS = 16
LOGIT_SCALE = 10.0


def digit_share(prompt, completion, row):
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


KILL_PLAN = "/tmp/rayllm-test-grpo-kill-{uid}.json".format(uid=os.getuid())
_calls = 0


def dies_once(prompt, completion, row):
    """A reward that SIGKILLs its own process (training rank 0, where rewards are scored) at its
    `at_call`-th call, once per plan: the plan file names a marker that the first kill creates."""
    global _calls
    _calls += 1
    plan = json.loads(open(KILL_PLAN).read())
    if _calls >= plan["at_call"] and not os.path.exists(plan["marker"]):
        open(plan["marker"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.0


def flaky(prompt, completion, row):
    if "1" in completion:
        raise ValueError("a reward with a bug")
    return 0.0


def _sft_dataset(tmp_path, records, tok, seq_len=128):
    """The layout `rayllm prepare` writes for data.mode sft (rendered chats, labels on the answers, packed)."""
    from rayllm.chat import render_chat
    from rayllm.data.pack import pack

    out = tmp_path / "prepared"
    tok.save_pretrained(out / "tokenizer")
    splits = {}
    for split, part in (("train", records[:160]), ("val", records[160:])):
        chats = [render_chat(tok, r["messages"]) for r in part]
        packed = pack([np.array(c.input_ids) for c in chats], seq_len, tok.pad_token_id, [np.array(c.labels()) for c in chats])
        (out / split).mkdir(parents=True)
        pq.write_table(pa.table({k: pa.array(getattr(packed, k).tolist(), type=pa.list_(pa.int32()))
                                 for k in ("input_ids", "labels", "doc_ids")}), out / split / "part-00000.parquet")
        splits[split] = {"path": split, "sequences": len(packed), "tokens": int(packed.n_tokens.sum()), "documents": len(part),
                         "pad_tokens": int(len(packed) * seq_len - packed.n_tokens.sum())}
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "mode": "sft", "seq_len": seq_len, "tokenizer": "tokenizer",
                                                   "splits": splits, "config_hash": "grpo-fixture"}))
    return out


def tiny_task(tmp_path):
    """(base folder, prepared sft dataset): a 2-layer d=64 Llama with a tokenizer trained on the sum task."""
    from rayllm.config import ModelConfig
    from rayllm.model import build_model

    records = problems(200, seed=0, high=20)
    base = tmp_path / "base"
    tok = train_tokenizer([" ".join(m["content"] for m in r["messages"]) for r in records], base, vocab_size=300)
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=False), tok, seed=0)
    # A fresh model's output layer (std 0.02) gives logits within about ±1 whatever its hidden state: its samples
    # stay near uniform and no policy could shift them. A trained model's logits span several units; scaled so.
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(base)
    return base, _sft_dataset(tmp_path, records, tok)


def grpo_config(base, dataset, out, iterations: int, eval_prompts: int = 8, **train_keys) -> dict:
    return {
        "model": {"path": str(base), "dtype": "float32", "lora": {"rank": 8, "alpha": 16}},
        "train": {"dataset": str(dataset), "output_dir": str(out), "run_name": "grpo", "objective": "grpo",
                  "num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 8, "max_steps": iterations,
                  "learning_rate": 1e-2, "lr_scheduler_type": "constant", "eval_every": iterations, "save_every": iterations,
                  "logging_steps": 1, "max_failures": 0, "zero_stage": 2, "ingest": "files", **train_keys,
                  "grpo": {"group_size": 4, "max_new_tokens": 8, "temperature": 1.0, "beta": 0.04, "updates_per_batch": 2,
                           "eval_prompts": eval_prompts,
                           "rewards": [{"kind": "function", "function": "tests.ray.test_train_grpo:digit_share"},
                                       {"kind": "function", "function": "tests.ray.test_train_grpo:flaky", "weight": 0.0}],
                           "rollout": {"num_actors": 1, "actor_cpus": 1, "max_model_len": 128, "dtype": "float32"}}},
    }


def offline_wandb_history(run_dir, tmp_path) -> list[dict]:
    """History rows of every offline W&B run under `run_dir` in order (a resumed run starts a second one)."""
    rows = []
    for k, run in enumerate(sorted(glob.glob(f"{run_dir}/wandb/offline-run-*"))):
        (tmp_path / f"wandb{k}" / "wandb").mkdir(parents=True)
        (tmp_path / f"wandb{k}" / "wandb" / "offline-run-0").symlink_to(run)
        rows += wandb_history(tmp_path / f"wandb{k}")
    return rows


def train_prompt_count(dataset) -> int:
    from transformers import AutoTokenizer

    from rayllm.train.data import PackedSplit
    from rayllm.train.rollout import prompts_of

    return len(prompts_of(PackedSplit.read(str(dataset), "train"), AutoTokenizer.from_pretrained(dataset / "tokenizer")))


def kill_rollout_actor_after(run_dir, resumed_at: int, step: int, killed: list, stop: threading.Event):
    """SIGKILL the resumed run's rollout actor once metrics.jsonl holds iteration `step`. The actor's
    process is found by class name through Ray's state API beforehand, while its engine starts: the
    iterations of the tiny task take a tenth of a second each, less than one state query."""
    from ray.util.state import list_actors

    def records():
        try:
            return read_metrics(run_dir)
        except (OSError, ValueError):  # not written yet, or a line half written
            return []

    pid = None
    while not stop.wait(0.02 if pid else 0.5):
        if pid is None:
            if any(r.get("event") == "start" and r["step"] == resumed_at for r in records()):
                alive = list_actors(filters=[("class_name", "=", "RolloutEngine"), ("state", "=", "ALIVE")], detail=True)
                pid = alive[0].pid if len(alive) == 1 and alive[0].pid else None
        elif any(r.get("step", 0) >= step and "reward_mean" in r for r in records()):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return


@pytest.mark.timeout(360)
def test_grpo_raises_the_reward_with_fresh_adapters_resumes_and_replaces_a_killed_actor(ray_local, tmp_path):
    from rayllm.train.data import StreamOrder

    base, dataset = tiny_task(tmp_path)
    half = ITERATIONS // 2
    keys = dict(report_to=["jsonl", "wandb"], save_every=half)
    first = train(grpo_config(base, dataset, tmp_path, ITERATIONS, stop_at_step=half, **keys))
    assert first["status"] == "stopped" and first["step"] == half, first
    kill_at, killed, stop = half + 1, [], threading.Event()
    killer = threading.Thread(target=kill_rollout_actor_after, args=(tmp_path / "grpo", half, kill_at, killed, stop), daemon=True)
    killer.start()
    try:
        result = train(grpo_config(base, dataset, tmp_path, ITERATIONS, **keys))  # the same command again
    finally:
        stop.set()
    assert len(killed) == 1, "the rollout actor was not killed while the run was going"
    assert result["status"] == "finished" and result["adapter_dir"], result
    records = read_metrics(tmp_path / "grpo")
    starts = [r for r in records if r.get("event") == "start"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (half, True)]
    steps = [r for r in records if "event" not in r and "reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(1, ITERATIONS + 1))
    # (a) every batch was generated by the policy version that trained on it, across the restart
    assert all(r["rollout_versions"] == [r["policy_version"]] == [r["step"] - 1] for r in steps)
    # (b) one engine per attempt until the kill, then its replacement, never restarted otherwise; each version reached
    # the engine under a new LoRA id, the only one loaded
    assert [r["actors_replaced"] for r in steps[:kill_at]] == [0] * kill_at
    replaced = next((i for i, r in enumerate(steps) if r["actors_replaced"]), None)
    assert replaced is not None, "the kill landed after the last iteration's generation"
    assert all(r["actors_replaced"] == 1 for r in steps[replaced:])
    engines = [{e for r in part for e in r["engines"]} for part in (steps[:half], steps[half:replaced], steps[replaced:])]
    assert all(len(e) == 1 for e in engines) and len(set.union(*engines)) == 3, engines
    assert [r["lora_id"] for r in steps] == list(range(1, ITERATIONS + 1))
    assert all(r["engines_loaded"] == [[r["lora_id"]]] for r in steps)
    # (c) the prompts are those of an uninterrupted run: the data order's cursor came back with the checkpoint
    order = StreamOrder(train_prompt_count(dataset), seed=0)
    assert [r["prompts"] for r in steps] == [order.global_batch(s, 4).tolist() for s in range(ITERATIONS)]
    # (d) the reward rises
    # (2e-2 over 12 iterations moved the policy by a KL of 10-45 in its first updates and once collapsed it
    # to digit-free completions; 1e-2 over 16 rose by 0.34-0.46 in three runs)
    first3, last3 = np.mean([r["reward/digit_share"] for r in steps[:3]]), np.mean([r["reward/digit_share"] for r in steps[-3:]])
    assert last3 > first3 + 0.15, [round(r["reward/digit_share"], 3) for r in steps]
    # the raising reward only counted, scored 0
    assert sum(r["reward_errors/flaky"] for r in steps) > 0 and all(r["reward/flaky"] == 0 for r in steps)
    # (e) the per-iteration fields
    for key in ("reward_mean", "reward_std", "reward_std/digit_share", "kl", "clip_fraction", "completion_length",
                "rollout_tokens_per_s", "time/generation_s", "time/training_s", "time/other_s", "loss", "logp_gap_vllm"):
        assert all(isinstance(r[key], (int, float)) for r in steps), key
    assert all(r["kl"] >= 0 and 0 <= r["clip_fraction"] <= 1 and 1 <= r["completion_length"] <= 8 for r in steps)
    evals = [r for r in records if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, half, ITERATIONS] and all("val_reward/digit_share" in e for e in evals)
    assert (tmp_path / "grpo" / "policy" / f"v{ITERATIONS}" / "adapter_model.safetensors").is_file()
    # (f) W&B (offline) got every iteration's reward figures; report.html plots them
    history = {row["_step"]: row for row in offline_wandb_history(tmp_path / "grpo", tmp_path) if "reward_mean" in row}
    assert sorted(history) == list(range(1, ITERATIONS + 1))
    assert all(history[r["step"]]["reward/digit_share"] == pytest.approx(r["reward/digit_share"]) and
               history[r["step"]]["kl"] == pytest.approx(r["kl"]) for r in steps)
    page = (tmp_path / "grpo" / "report.html").read_text()
    assert "<h2>GRPO</h2>" in page and "alt='reward, KL, clip fraction, completion length'" in page


@pytest.mark.timeout(180)
@pytest.mark.parametrize("weight_sync", ["object_store", "collective"])
def test_full_fine_tune_weights_reach_the_running_engine(ray_local, tmp_path, weight_sync):
    """A full fine-tune's weights into the running vLLM engine of a rollout actor (no restart), through
    the object store or broadcast over the gloo group of this process and the actor: the engine then
    holds the trainer's parameters (a checksum, and greedy answers equal to the trainer's model's,
    which needs every layer, q/k/v fused by vLLM included) and tags its rollouts with the loaded
    version. With the broadcast the actor is then SIGKILLed: its replacement joins a new group, gets
    the same weights before it samples and answers the same."""
    from transformers import AutoModelForCausalLM

    from rayllm.config.train import RolloutConfig
    from rayllm.train.grpo import CHECKSUM_PARAM, full_weights
    from rayllm.train.rollout import RolloutPool

    base, _ = tiny_task(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = RolloutConfig(num_actors=1, actor_cpus=1, max_model_len=128, dtype="float32", weight_sync=weight_sync)
    pool = RolloutPool(str(base), cfg, 0, seed=0)
    try:
        greedy = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "stop_token_ids": [], "ignore_eos": True}
        prompt, policy = [5, 6, 7, 8], {"name": None, "id": None, "path": None, "version": 1}
        before = pool.generate([prompt], policy, greedy, 1)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        sync = pool.load_weights(full_weights(SimpleNamespace(module=model)), 1, [CHECKSUM_PARAM])
        after = pool.generate([prompt], policy, greedy, 1)
        if weight_sync == "collective":
            import ray

            os.kill(ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
            replaced = pool.generate([prompt], policy, greedy, 1)
    finally:
        pool.close()
    state = model.state_dict()
    assert before["engines"] == after["engines"], "the same engine, not a restarted one"
    assert sync["weights_sync"] == weight_sync
    (sums,) = sync["engine_checksums"]
    assert sync["engine_weight_versions"] == [1] and before["group_versions"] == [None] and after["group_versions"] == [1]
    assert sums[CHECKSUM_PARAM] == pytest.approx(float(state[CHECKSUM_PARAM].double().sum()), rel=1e-6)
    ids = list(prompt)
    with torch.no_grad():  # the trainer's model, greedy: what the engine must now answer
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert after["groups"][0][0]["ids"] == ids[4:] != before["groups"][0][0]["ids"]
    if weight_sync == "collective":
        assert replaced["actors_replaced"] == 1 and replaced["engines"] != after["engines"]
        assert replaced["group_versions"] == [1] and replaced["groups"][0][0]["ids"] == ids[4:]


@pytest.mark.timeout(300)
def test_a_killed_training_worker_resumes_from_the_last_checkpoint_with_fresh_engines(ray_local, tmp_path):
    """Training rank 0 (which drives the rollouts and owns the rollout actor) is SIGKILLed while it
    scores iteration 4: Ray Train restarts the worker group from the step-2 checkpoint, a new engine
    starts (the old one died with its owner), and iterations 3.. are done again with the restored
    policy versions, LoRA ids and prompt order; metrics.jsonl keeps one record per iteration."""
    from rayllm.train.data import StreamOrder

    base, dataset = tiny_task(tmp_path)
    iterations, per_iteration = 6, 16  # 4 prompts x group_size 4 completions, each scored once
    (tmp_path / "plan.json").write_text(json.dumps({"at_call": 3 * per_iteration + 1, "marker": str(tmp_path / "killed")}))
    os.replace(tmp_path / "plan.json", KILL_PLAN)
    cfg = grpo_config(base, dataset, tmp_path, iterations, eval_prompts=0, save_every=2, max_failures=1)
    cfg["train"]["grpo"]["rewards"].append({"kind": "function", "function": "tests.ray.test_train_grpo:dies_once", "weight": 0.0})
    try:
        result = train(cfg)
    finally:
        os.unlink(KILL_PLAN)
    assert (tmp_path / "killed").exists(), "the training worker was not killed"
    assert result["status"] == "finished" and result["step"] == iterations, result
    records = read_metrics(tmp_path / "grpo")
    starts = [r for r in records if r.get("event") == "start"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (2, True)]
    steps = [r for r in records if "event" not in r and "reward_mean" in r]
    # the resumed attempt dropped what the killed one logged after its checkpoint (iteration 3) and did it again
    assert [r["step"] for r in steps] == list(range(1, iterations + 1))
    assert all(r["policy_version"] == r["step"] - 1 and r["rollout_versions"] == [r["step"] - 1] for r in steps)
    assert [r["lora_id"] for r in steps] == list(range(1, iterations + 1))
    before, after = {e for r in steps[:2] for e in r["engines"]}, {e for r in steps[2:] for e in r["engines"]}
    assert len(before) == len(after) == 1 and before != after, "a new engine after the restart"
    order = StreamOrder(train_prompt_count(dataset), seed=0)
    assert [r["prompts"] for r in steps] == [order.global_batch(s, 4).tolist() for s in range(iterations)]
