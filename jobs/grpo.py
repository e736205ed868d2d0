"""GRPO of a LoRA adapter with rewards from code: prepare prompts with reference answers (data.mode:
sft) → train with train.objective: grpo (Ray Train + DeepSpeed policy, vLLM rollout actors) → the
adapter with its held-out reward → the registry.

    python jobs/grpo.py jobs/configs/grpo_tiny.yaml --task 2000 --publish sums-rl
    ray job submit --working-dir . -- python jobs/grpo.py jobs/configs/grpo_tiny.yaml --publish sums-rl

--task N first writes N problems of the verifiable sum task (rayllm/data/verifiable.py) to the first
data input when that file is missing; without it, data.inputs are your own conversations, whose
assistant turns are the reference answers.
"""

import argparse
import json
from pathlib import Path

from rayllm.config import load_config
from rayllm.data.prepare import run as prepare
from rayllm.data.verifiable import problems, write_jsonl
from rayllm.registry import Registry
from rayllm.train.launch import run as train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
parser.add_argument("--task", type=int, metavar="N", help="generate N problems of the verifiable sum task if the input is missing")
parser.add_argument("--publish", metavar="NAME", help="publish the adapter to the registry under NAME")
args = parser.parse_args()

cfg = load_config(args.config)  # validated before Ray starts
if cfg.data is None or cfg.data.mode != "sft" or cfg.train is None or cfg.train.objective != "grpo":
    raise SystemExit(f"{args.config}: needs data.mode: sft and train.objective: grpo (see jobs/configs/grpo_tiny.yaml)")
if args.task and not Path(cfg.data.inputs[0]).exists():
    print("task problems:", write_jsonl(problems(args.task, seed=0, high=50), cfg.data.inputs[0]))
prepare(cfg.data)
result = train(cfg)
figures = {k: v for k, v in result.items() if k.startswith(("reward", "val_reward")) or k in ("kl", "clip_fraction")}
print(json.dumps({"status": result.get("status"), "step": result.get("step"), **figures, "adapter_dir": result.get("adapter_dir")}, indent=2))
if args.publish and result.get("adapter_dir"):
    metrics = {k: v for k, v in figures.items() if k.startswith("val_reward") and v is not None}
    ref = Registry(cfg.registry.path).publish(args.publish, result["adapter_dir"], metrics=metrics, source_run=result["run_dir"])
    print(f"published {ref}; serve it by name: rayllm serve with it in serve.adapters, or promote an alias to it")
