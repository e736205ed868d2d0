"""Prepare a corpus on Ray Data: clean, dedup, split, train a tokenizer, tokenize and pack.

    python jobs/prepare.py jobs/configs/prepare_tiny.yaml
    ray job submit --working-dir . -- python jobs/prepare.py jobs/configs/prepare_tiny.yaml
"""

import argparse
import json

from rayllm.config import load_config
from rayllm.data.prepare import run

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
args = parser.parse_args()

cfg = load_config(args.config)  # validated before Ray starts
manifest = run(cfg.data, force=args.force)  # joins RAY_ADDRESS when a job runs on a cluster
print(json.dumps({"output_dir": manifest["output_dir"], "splits": manifest["splits"]}, indent=2))
