"""DPO on the real stack: `rayllm prepare` (Ray Data, data.mode preference) turns generated pairs of the
verifiable sum task into one row per pair, then a LoRA DPO run on 2 CPU workers (Ray Train + DeepSpeed
ZeRO-2) raises val preference accuracy and the reward margin, with the reference being the base under
the disabled adapter. The model is a tiny Llama saved as a base folder, with its own tokenizer."""

import json

import pytest

from rayllm.data.preference import pair_text
from rayllm.data.verifiable import pairs
from tests.ray.train_fixtures import read_metrics, train, train_tokenizer

pytestmark = pytest.mark.slow
BAD = [
    {"prompt": "What is 1 + 1?", "chosen": "= 2"},  # missing_field
    {"prompt": "What is 1 + 2?", "chosen": "= 3", "rejected": " = 3 "},  # identical after cleaning
    {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},  # bad_messages
]


def _base(tmp_path, records):
    """A tiny Llama with a tokenizer trained on the task's text, saved as an HF base folder."""
    from rayllm.config import ModelConfig
    from rayllm.model import build_model

    base = tmp_path / "base"
    texts = [pair_text(json.dumps({side: r[side] if isinstance(r[side], list) else [{"role": "user", "content": r[side]}]
                                   for side in ("prompt", "chosen", "rejected")})) for r in records]
    tok = train_tokenizer(texts, base, vocab_size=400)
    build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=256), tok, seed=0).save_pretrained(base)
    return base


@pytest.mark.timeout(300)
def test_dpo_lora_raises_val_preference_accuracy(ray_local, tmp_path):
    from rayllm.config import parse_config
    from rayllm.data.prepare import run as prepare

    records = pairs(320, seed=0, high=20)
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records + BAD))
    base = _base(tmp_path, records)
    data = parse_config({"data": {"inputs": [str(raw)], "mode": "preference", "output_dir": str(tmp_path / "prepared"),
                                  "seq_len": 160, "val_fraction": 0.2, "tokenizer": {"path": str(base)}}}).data
    manifest = prepare(data)
    assert manifest["mode"] == "preference" and manifest["rejects"] == {"bad_messages": 1, "identical": 1, "missing_field": 1}
    assert manifest["pairs"] == 320 == sum(s["sequences"] for s in manifest["splits"].values())
    assert manifest["splits"]["val"]["sequences"] >= 32

    result = train({
        "model": {"path": str(base), "dtype": "float32", "lora": {"rank": 8, "alpha": 16}},
        "train": {"dataset": str(tmp_path / "prepared"), "output_dir": str(tmp_path), "run_name": "dpo", "objective": "dpo",
                  "dpo": {"beta": 0.1}, "num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 8, "max_steps": 60,
                  "learning_rate": 5e-3, "lr_scheduler_type": "constant", "eval_every": 6, "eval_batches": 4,
                  "save_every": 60, "logging_steps": 6, "max_failures": 0, "zero_stage": 2, "ingest": "files"},
    })
    assert result["status"] == "finished" and result["adapter_dir"]
    evals = [m for m in read_metrics(tmp_path / "dpo") if m.get("event") == "eval"]
    first, last = evals[0], evals[-1]
    # At step 0 the policy is the reference: every reward is 0, so accuracy (margin > 0) is 0 and chance is 0.5.
    # A model that cannot add tells a wrong sum from the right one by chance only: about 5/6 is the ceiling here.
    # One eval sees about 48 pairs, so a single figure moves by 1/48 between machines (0.75 here, 35/48 on
    # another): the second half's mean is judged, well above chance (0.5, one standard deviation 0.07).
    late = [m["val_rewards/accuracies"] for m in evals[len(evals) // 2:]]
    assert sum(late) / len(late) >= 0.7 and min(late) >= 0.65, evals
    # The margin grows; by how much after 60 steps differs between machines (different CPU kernels round
    # differently, and the trajectories part): one CI machine reached only 1.48x the first eval's margin.
    assert last["val_rewards/margins"] > first["val_rewards/margins"] > 0, evals
    assert last["val_loss"] < first["val_loss"] < 0.6932, "DPO's loss starts at ln 2 and falls"
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "val_loss",
                "val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins", "val_rewards/accuracies"):
        assert isinstance(result[key], float), key
    meta = json.loads((tmp_path / "dpo" / "adapter" / "rayllm_adapter.json").read_text())
    assert meta["metrics"]["val_rewards/accuracies"] == result["val_rewards/accuracies"]

    # A full fine-tune under ZeRO-3: the reference is a sharded frozen copy, run once over both splits
    # before step 1 (precompute_reference) and then dropped; the rewards start from it all the same.
    full = train({
        "model": {"path": str(base), "dtype": "float32"},
        "train": {"dataset": str(tmp_path / "prepared"), "output_dir": str(tmp_path), "run_name": "dpo-full", "objective": "dpo",
                  "dpo": {"beta": 0.1, "precompute_reference": True}, "num_workers": 2, "cpus_per_worker": 0.5,
                  "micro_batch_size": 8, "max_steps": 8, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
                  "eval_every": 4, "eval_batches": 2, "save_every": 8, "logging_steps": 4, "max_failures": 0,
                  "zero_stage": 3, "ingest": "files"},
    })
    evals = [m for m in read_metrics(tmp_path / "dpo-full") if m.get("event") == "eval"]
    assert full["status"] == "finished" and (tmp_path / "dpo-full" / "model" / "config.json").is_file()
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 0.6932 and evals[-1]["val_rewards/margins"] > 0, evals
