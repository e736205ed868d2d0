"""Evaluate models, adapters, registry versions and endpoints side by side: perplexity, generation
tasks (BLEU, ROUGE-L, EM, F1 on vLLM in a Ray Data actor pool) and lm-eval-harness tasks.

    python jobs/eval.py jobs/configs/eval_tiny.yaml
    ray job submit --working-dir . -- python jobs/eval.py jobs/configs/eval_tiny.yaml
"""

import argparse
import sys

from rayllm.config import load_config
from rayllm.eval.run import run
from rayllm.eval.targets import EvalError

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
args = parser.parse_args()

cfg = load_config(args.config)
if cfg.eval is None:
    raise SystemExit(f"{args.config}: an eval: section is required (see jobs/configs/eval_tiny.yaml)")
try:
    report = run(cfg, source=args.config)  # prints the side-by-side table; eval.json / eval.csv under output_dir/name
except EvalError as exc:
    print(f"eval: {exc}", file=sys.stderr)
    sys.exit(2)
print(f"{len(report['targets'])} target(s) evaluated: " + ", ".join(t["label"] for t in report["targets"]))
