"""Pretrain a Llama from scratch on a prepared dataset: Ray Train + DeepSpeed ZeRO on CPU or GPU.

    python jobs/pretrain.py jobs/configs/pretrain_tiny.yaml
    rayllm plan jobs/configs/pretrain_tiny.yaml      # memory per worker, before taking any resource
    ray job submit --working-dir . -- python jobs/pretrain.py jobs/configs/pretrain_tiny.yaml
"""

import argparse
import json

from rayllm.config import load_config
from rayllm.train.launch import run

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
args = parser.parse_args()

cfg = load_config(args.config)  # every config error at once, before Ray starts
result = run(cfg)  # plans memory, trains, evaluates, checkpoints; rerunning resumes
print(json.dumps({k: result.get(k) for k in ("status", "step", "val_loss", "val_ppl", "model_dir", "checkpoint")}, indent=2))
