"""A run dir on an object store: `train.output_dir: s3://...` (moto's S3 server on loopback stands in
for S3). Ray Train persists the checkpoints there, rank 0 pushes metrics, the adapter and
result.json, a stopped run resumes from the checkpoint it left in the bucket, and the registry
publishes the adapter straight from its s3:// folder."""

from __future__ import annotations

import json
import socket

import pytest

from tests.ray.train_fixtures import make_dataset, tiny_config, train

pytestmark = [pytest.mark.slow]
moto_server = pytest.importorskip("moto.server")
BUCKET = "runs-bucket"


@pytest.fixture
def s3(monkeypatch):
    """A loopback S3 and the standard AWS environment pointing at it (inherited by Ray's workers)."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _base_model(tmp_path, dataset):
    from rayllm.config import ModelConfig
    from rayllm.model import build_model, load_tokenizer

    tok = load_tokenizer(dataset / "tokenizer")
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=128), tok, "float32", seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.timeout(900)
def test_run_dir_and_checkpoints_on_s3_resume_and_publish(own_ray, s3, tmp_path, monkeypatch):
    from rayllm.registry import Registry

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dataset = make_dataset(tmp_path / "data", seq_len=32, n_docs=200, val_docs=40)
    raw = tiny_config(dataset, f"s3://{BUCKET}/runs", max_steps=6, save_every=3, eval_every=3, eval_batches=1,
                      logging_steps=1, stop_at_step=3)
    raw["model"] = {"path": str(_base_model(tmp_path, dataset)), "dtype": "float32", "lora": {"rank": 4, "alpha": 16}}

    first = train(raw)  # stops with a checkpoint at step 3, all of it in the bucket
    assert first["status"] == "stopped" and first["step"] == 3
    keys = _keys(s3, "runs/run/")
    assert "runs/run/config.yaml" in keys and "runs/run/result.json" in keys and "runs/run/metrics.jsonl" in keys
    assert any(k.startswith("runs/run/checkpoint_0000003/") for k in keys), keys

    raw["train"].pop("stop_at_step")
    done = train(raw)  # the same run goes on from the checkpoint in the bucket
    assert done["status"] == "finished" and done["step"] == 6
    assert done["adapter_dir"] == f"s3://{BUCKET}/runs/run/adapter"
    keys = _keys(s3, "runs/run/")
    assert {"runs/run/adapter/adapter_model.safetensors", "runs/run/adapter/rayllm_adapter.json", "runs/run/loss_curve.png"} <= set(keys)
    metrics = [json.loads(line) for line in s3.get_object(Bucket=BUCKET, Key="runs/run/metrics.jsonl")["Body"].read().decode().splitlines()]
    starts = [m for m in metrics if m.get("event") == "start"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (3, True)]
    assert sorted(m["step"] for m in metrics if "loss" in m and "event" not in m) == [1, 2, 3, 4, 5, 6]

    again = train(raw)  # a finished run in the bucket is returned as it is
    assert again["status"] == "finished" and again["step"] == 6

    reg = Registry(str(tmp_path / "registry"))
    assert reg.publish("s3run", done["adapter_dir"]) == "s3run@v1"
    assert reg.show("s3run@v1", verify=True)["manifest"]["rank"] == 4
