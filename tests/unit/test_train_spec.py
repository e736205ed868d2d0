"""The RunSpec: built once on the driver from the validated config and handed to every worker as is."""

import pickle
from dataclasses import FrozenInstanceError

import pytest

from rayllm.config import config_hash, parse_config
from rayllm.train.run_store import RunStore
from rayllm.train.spike import INJECT_ENV
from tests.ray.train_fixtures import make_dataset, tiny_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), seq_len=64, n_docs=60, val_docs=20)


def build(raw: dict):
    from rayllm.train.spec import run_spec
    from rayllm.train.trainer import prepare_run

    cfg = parse_config(raw)
    pre, run = prepare_run(cfg, dry=True)
    return cfg, run, run_spec(cfg, pre, run)


def test_the_spec_holds_the_validated_sections_themselves(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(INJECT_ENV, raising=False)
    cfg, run, spec = build(tiny_config(dataset, tmp_path))
    assert spec.train is cfg.train and spec.model is cfg.model, "no dump to plain data, no second validation"
    assert spec.batching.global_batch == 8 and spec.eval_micro_batches == 1  # capped by the small val split
    assert spec.config_hash == config_hash(cfg) and spec.base_dir is None and spec.base_fingerprint is None
    assert spec.run_dir == str(tmp_path / "run") and spec.run_uri is None
    assert spec.inject_spike_at == frozenset() and spec.wandb is None
    with pytest.raises(FrozenInstanceError):
        spec.run_dir = "elsewhere"
    shipped = pickle.loads(pickle.dumps(spec))  # what Ray does on the way to each worker
    assert shipped == spec and shipped.train.learning_rate == 3e-3


def test_learning_rate_reaches_the_optimizer_config_unchanged(dataset, tmp_path):
    from rayllm.train.zero import deepspeed_config

    cfg, _, spec = build(tiny_config(dataset, tmp_path, learning_rate=7e-4))
    ds = deepspeed_config(spec.train, spec.batching, "float32", spec.planned_trainable_params)
    assert ds["optimizer"]["params"]["lr"] == cfg.train.learning_rate == 7e-4


def test_the_driver_decides_the_spike_hook_and_wandb(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "5, 9")
    _, _, spec = build(tiny_config(dataset, tmp_path, report_to=["jsonl", "wandb"], wandb_group="g"))
    assert spec.inject_spike_at == {5, 9}
    assert spec.wandb["name"] == "run" and spec.wandb["group"] == "g" and spec.wandb["mode"] == "offline"
    assert spec.wandb["config"]["train"]["learning_rate"] == 3e-3


def test_a_worker_finds_the_drivers_run_folder(tmp_path):
    disk = RunStore(str(tmp_path), "r")
    assert RunStore.on_worker(str(disk.local), disk.uri).local == disk.local
    bucket = RunStore("s3://bucket/runs", "r")
    worker = RunStore.on_worker(str(bucket.local), bucket.uri)
    assert (worker.uri, worker.root_uri, worker.local) == (bucket.uri, bucket.root_uri, bucket.local)
