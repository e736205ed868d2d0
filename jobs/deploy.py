"""Deploy the OpenAI-compatible endpoint (Ray Serve + vLLM, adapters from the registry) and leave it running.

    python jobs/deploy.py jobs/configs/serve_tiny.yaml
    ray job submit --working-dir . -- python jobs/deploy.py jobs/configs/serve_tiny.yaml
"""

import argparse

import ray

from rayllm.config import load_config
from rayllm.serve.deploy import deploy

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
args = parser.parse_args()

cfg = load_config(args.config)  # validated before Ray is touched
if cfg.serve is None:
    raise SystemExit(f"{args.config}: a serve section is required")
ray.init()  # inside `ray job submit`, the job's cluster; `python jobs/deploy.py` needs RAY_ADDRESS or starts a local one
url = deploy(cfg)  # returns once /health answers; the application outlives this driver
print(f"endpoint: {url}  (models: {url}/models)")
