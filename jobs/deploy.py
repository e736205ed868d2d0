"""Deploy the OpenAI-compatible endpoint (Ray Serve + vLLM, adapters from the registry) on a running
Ray cluster and leave it running there.

    ray job submit --working-dir . -- python jobs/deploy.py jobs/configs/serve_tiny.yaml
    RAY_ADDRESS=HEAD:6379 python jobs/deploy.py jobs/configs/serve_tiny.yaml
    python jobs/deploy.py jobs/configs/serve_tiny.yaml --address auto   # a `ray start --head` on this machine
"""

import argparse
import sys

import ray

from rayllm.config import load_config
from rayllm.serve.deploy import cluster_address, deploy

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
parser.add_argument("--address", default=None, help="Ray cluster to deploy on (default: RAY_ADDRESS, which `ray job submit` sets).")
args = parser.parse_args()

cfg = load_config(args.config)  # validated before Ray is touched
if cfg.serve is None:
    raise SystemExit(f"{args.config}: a serve section is required")
address = cluster_address(args.address)
if address is None:
    print(f"jobs/deploy.py: no Ray cluster to deploy on: set RAY_ADDRESS or pass --address (`--address auto` for a "
          f"`ray start --head` on this machine), or run `rayllm serve {args.config}`, which starts Ray and serves "
          "until Ctrl-C", file=sys.stderr)
    sys.exit(2)
ray.init(address=address)
url = deploy(cfg)  # returns once /health answers; the application outlives this driver
print(f"endpoint: {url}  (models: {url}/models)")
