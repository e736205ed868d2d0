"""Sweep learning rates with Ray Tune + ASHA over the real trainer; publish and promote the best adapter.

    python jobs/sweep.py jobs/configs/sweep_tiny.yaml
    ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/sweep_tiny.yaml
"""

import argparse
import json

from rayllm.config import load_config
from rayllm.tune.sweep import run

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
args = parser.parse_args()

cfg = load_config(args.config)
summary = run(cfg)  # rerunning the same command resumes an interrupted sweep
print(json.dumps(summary, indent=2))
