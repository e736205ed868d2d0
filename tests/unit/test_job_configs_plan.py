"""Every training config in jobs/configs/ passes `rayllm plan` (the check `rayllm train` runs first).

The GPU configs point at datasets and base models on a cluster volume; here each gets a stand-in
with the same facts the planner reads: a manifest (sequence length, split sizes), a tokenizer,
and for a fine-tune the base model's real config.json (no weights are needed to plan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rayllm.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = [p for p in sorted((ROOT / "jobs" / "configs").glob("*.yaml")) if "train" in yaml.safe_load(p.read_text())]
# Meta-Llama-3.1-8B's architecture (config.json on the model card).
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from rayllm.config.data import TokenizerConfig
    from rayllm.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([f"sentence number {i} of a tiny corpus" for i in range(200)], TokenizerConfig(vocab_size=300), out)
    return out


def _stand_ins(raw: dict, tmp: Path, tokenizer_dir: Path) -> dict:
    import shutil

    dataset = tmp / "dataset"
    shutil.copytree(tokenizer_dir, dataset / "tokenizer")
    seq_len = 2048 if raw["train"].get("use_gpu") else 128
    splits = {"train": {"sequences": 1_000_000, "tokens": 1_000_000 * seq_len}, "val": {"sequences": 10_000, "tokens": 10_000 * seq_len}}
    (dataset / "manifest.json").write_text(json.dumps({"schema_version": 1, "seq_len": seq_len,
                                                       "mode": "preference" if raw["train"].get("objective") == "dpo" else "sft",
                                                       "tokenizer": "tokenizer", "splits": splits}))
    raw["train"]["dataset"] = str(dataset)
    if raw.get("model", {}).get("path"):
        base = tmp / "base"
        shutil.copytree(tokenizer_dir, base)
        arch = LLAMA_8B if raw["train"].get("use_gpu") else {**LLAMA_8B, "hidden_size": 256, "intermediate_size": 688,
                                                             "num_hidden_layers": 4, "num_attention_heads": 4,
                                                             "num_key_value_heads": 4, "vocab_size": 300}
        (base / "config.json").write_text(json.dumps(arch))
        raw["model"]["path"] = str(base)
    return raw


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_job_config_plans(path, tmp_path, tokenizer_dir, capsys, monkeypatch):
    from rayllm.train.launch import plan_main

    monkeypatch.delenv("RAYLLM_STORAGE", raising=False)
    cfg = parse_config(_stand_ins(yaml.safe_load(path.read_text()), tmp_path, tokenizer_dir), str(path))
    code = plan_main(cfg)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DeepSpeed" in out  # our figures beside DeepSpeed's own estimator
