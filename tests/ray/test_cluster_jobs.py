"""`ray job submit` end to end on a two-node Ray cluster: prepare → LoRA fine-tune across both
nodes → deploy, then the endpoint answers. Every artifact path in the job configs is relative and
lands under RAYLLM_STORAGE (the shared storage root), as it would on a real cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml

from tests.ray.cluster_nodes import LocalCluster, free_port
from tests.ray.train_fixtures import corpus

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _tiny_base(storage: Path) -> None:
    """A 2-layer Llama on the tokenizer the prepare job trained (the fine-tune's base model)."""
    from rayllm.config import ModelConfig
    from rayllm.model import build_model, load_tokenizer

    tok = load_tokenizer(storage / "runs/data/pretrain/tokenizer")
    # 2 heads: head size 32, which vLLM's CPU attention supports (16 is refused)
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=128), tok, "float32", seed=0)
    model.save_pretrained(storage / "runs/base")
    tok.save_pretrained(storage / "runs/base")


@pytest.mark.timeout(1200)
def test_prepare_finetune_deploy_on_two_nodes(tmp_path):
    storage, confs = tmp_path / "shared", tmp_path / "configs"
    storage.mkdir()
    confs.mkdir()
    raw = tmp_path / "corpus.txt"
    raw.write_text("\n".join(corpus(600, seed=3)) + "\n")
    env = {"RAYLLM_STORAGE": str(storage), "OMP_NUM_THREADS": "1"}
    port = free_port()
    # Relative paths throughout: RAYLLM_STORAGE places them on the storage every node sees.
    prepare = _write(confs / "prepare.yaml", {"data": {
        "inputs": [str(raw)], "text_unit": "line", "output_dir": "runs/data/pretrain", "seq_len": 64, "val_fraction": 0.1,
        "num_actors": 2, "actor_cpus": 0.5, "tokenizer": {"vocab_size": 512}}})
    finetune = _write(confs / "finetune.yaml", {
        "model": {"path": "runs/base", "dtype": "float32", "lora": {"rank": 4, "alpha": 16}},
        "train": {"dataset": "runs/data/pretrain", "output_dir": "runs/train", "run_name": "ft", "num_workers": 2,
                  "cpus_per_worker": 1, "zero_stage": 2, "micro_batch_size": 4, "max_steps": 6, "learning_rate": 3e-3,
                  "warmup_steps": 1, "eval_every": 3, "save_every": 3, "eval_batches": 1, "logging_steps": 1,
                  "report_to": ["jsonl"]}})
    deploy = _write(confs / "deploy.yaml", {
        "serve": {"model": "runs/base", "served_model_name": "base", "dtype": "float32", "max_model_len": 128, "cpu_threads": 1,
                  "max_lora_rank": 8, "replica_cpus": 1, "adapters": {"ft": "runs/train/ft/adapter"}, "port": port}})

    with LocalCluster(tmp_path / "ray-logs", nodes=2, cpus=1) as cluster:
        nodes = cluster.alive_nodes()
        assert len(nodes) == 2

        status = cluster.submit("rayllm-prepare", ["python", "jobs/prepare.py", prepare], REPO, env)
        assert status == "SUCCEEDED", cluster.job_logs("rayllm-prepare")
        manifest = json.loads((storage / "runs/data/pretrain/manifest.json").read_text())
        assert manifest["splits"]["train"]["sequences"] > 0

        _tiny_base(storage)
        status = cluster.submit("rayllm-finetune", ["python", "jobs/finetune.py", finetune], REPO, env)
        assert status == "SUCCEEDED", cluster.job_logs("rayllm-finetune")
        result = json.loads((storage / "runs/train/ft/result.json").read_text())
        assert result["status"] == "finished" and result["step"] == 6
        # One training worker on each node: the run really spanned the cluster.
        assert sorted(result["worker_nodes"]) == sorted(nodes), (result["worker_nodes"], nodes)
        assert (storage / "runs/train/ft/adapter/adapter_model.safetensors").is_file()

        status = cluster.submit("rayllm-deploy", ["python", "jobs/deploy.py", deploy], REPO, env)
        assert status == "SUCCEEDED", cluster.job_logs("rayllm-deploy")
        # The application outlives the deploy job's driver.
        url = f"http://127.0.0.1:{port}/v1"
        models = requests.get(f"{url}/models", timeout=30).json()
        assert {"base", "ft"} <= {m["id"] for m in models["data"]}
        for model in ("base", "ft"):
            reply = requests.post(f"{url}/completions", timeout=120, json={
                "model": model, "prompt": "the cat sees", "max_tokens": 8, "temperature": 0})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["model"] == model and body["usage"]["completion_tokens"] > 0
    # The cluster's own nodes are gone; nothing else was stopped.
    assert all(p.poll() is not None for p in cluster.procs)
