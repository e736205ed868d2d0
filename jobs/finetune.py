"""LoRA fine-tune of a pretrained base (an HF folder, a .gguf file, or `smollm2`) on a prepared dataset
tokenized with the base's tokenizer; hands on a PEFT adapter with rayllm_adapter.json for the registry.

    python jobs/finetune.py jobs/configs/finetune_tiny.yaml
    ray job submit --working-dir . -- python jobs/finetune.py jobs/configs/finetune_tiny.yaml
"""

import argparse
import json

from rayllm.config import load_config
from rayllm.train.launch import run

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("config")
args = parser.parse_args()

cfg = load_config(args.config)
if cfg.model is None or cfg.model.lora is None:
    raise SystemExit(f"{args.config}: model.lora is required for a LoRA fine-tune (see jobs/configs/finetune_tiny.yaml)")
result = run(cfg)
adapter = result.get("adapter_dir")
print(json.dumps({k: result.get(k) for k in ("status", "step", "val_loss", "val_ppl", "adapter_dir")}, indent=2))
if adapter:
    print(f"publish it: rayllm registry publish NAME {adapter}")
