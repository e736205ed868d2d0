"""DPO of a LoRA adapter on preference pairs: prepare them (data.mode: preference) → train with
train.objective: dpo on Ray Train + DeepSpeed → the adapter with its reward figures → the registry.

    python jobs/dpo.py jobs/configs/dpo_tiny.yaml --task 2000 --publish sums
    ray job submit --working-dir . -- python jobs/dpo.py jobs/configs/dpo_tiny.yaml --publish sums

--task N first writes N pairs of the verifiable sum task (rayllm/data/verifiable.py) to the first
data input when that file is missing; without it, data.inputs are your own preference files.
"""

import argparse
import json
from pathlib import Path

from rayllm.config import load_config
from rayllm.data.prepare import run as prepare
from rayllm.data.verifiable import pairs, write_jsonl
from rayllm.registry import Registry
from rayllm.train.launch import run as train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
parser.add_argument("--task", type=int, metavar="N", help="generate N pairs of the verifiable sum task if the input is missing")
parser.add_argument("--publish", metavar="NAME", help="publish the adapter to the registry under NAME")
args = parser.parse_args()

cfg = load_config(args.config)  # validated before Ray starts
if cfg.data is None or cfg.data.mode != "preference" or cfg.train is None or cfg.train.objective != "dpo":
    raise SystemExit(f"{args.config}: needs data.mode: preference and train.objective: dpo (see jobs/configs/dpo_tiny.yaml)")
if args.task and not Path(cfg.data.inputs[0]).exists():
    print("task pairs:", write_jsonl(pairs(args.task, seed=0, high=50), cfg.data.inputs[0]))
manifest = prepare(cfg.data)
result = train(cfg)
keys = ["status", "step", "loss", "rewards/accuracies", "val_loss", "val_rewards/chosen", "val_rewards/rejected",
        "val_rewards/margins", "val_rewards/accuracies", "adapter_dir"]
print(json.dumps({"pairs": manifest.get("pairs"), **{k: result.get(k) for k in keys}}, indent=2))
if args.publish and result.get("adapter_dir"):
    metrics = {k: result[k] for k in keys[4:-1] if result.get(k) is not None}
    ref = Registry(cfg.registry.path).publish(args.publish, result["adapter_dir"], metrics=metrics, source_run=result["run_dir"])
    print(f"published {ref}; serve it by name: rayllm serve with it in serve.adapters, or promote an alias to it")
