"""`storage` / RAYLLM_STORAGE: relative artifact paths resolve against one root every node sees."""

import pytest

from rayllm.config import ConfigError, parse_config

RAW = {
    "data": {"inputs": ["jobs/data/x.jsonl", "botchan"], "output_dir": "runs/data/sft", "tokenizer": {"path": "runs/data/pretrain/tokenizer"}},
    "model": {"path": "runs/train/pretrain/model", "lora": {"rank": 4}},
    "train": {"dataset": "runs/data/sft", "output_dir": "/abs/train"},
    "tune": {"output_dir": "runs/sweeps"},
    "serve": {"model": "smollm2", "adapters": {"a": "runs/train/a/adapter", "b": "s3://bucket/b"}, "state_dir": "runs/serve-state"},
}


def test_relative_artifact_paths_resolve_against_storage(monkeypatch):
    monkeypatch.delenv("RAYLLM_STORAGE", raising=False)
    cfg = parse_config({**RAW, "storage": "/shared/rayllm"})
    assert cfg.data.output_dir == "/shared/rayllm/runs/data/sft"
    assert cfg.data.tokenizer.path == "/shared/rayllm/runs/data/pretrain/tokenizer"
    assert cfg.model.path == "/shared/rayllm/runs/train/pretrain/model"
    assert cfg.train.dataset == "/shared/rayllm/runs/data/sft"
    assert cfg.tune.output_dir == "/shared/rayllm/runs/sweeps"
    assert cfg.registry.path == "/shared/rayllm/runs/registry"  # the default is resolved too
    assert cfg.registry.cache_dir == "/shared/rayllm/runs/registry-cache"
    assert cfg.serve.adapters == {"a": "/shared/rayllm/runs/train/a/adapter", "b": "s3://bucket/b"}
    assert cfg.serve.state_dir == "/shared/rayllm/runs/serve-state"  # every ingress replica reads the same record
    # Absolute paths, keywords and raw inputs stay as written.
    assert cfg.train.output_dir == "/abs/train" and cfg.serve.model == "smollm2"
    assert cfg.data.inputs == ["jobs/data/x.jsonl", "botchan"]
    # Re-parsing a dumped config (what sweep trials and serve replicas do) changes nothing.
    again = parse_config(cfg.model_dump(mode="json", exclude_none=True))
    assert again.model_dump() == cfg.model_dump()


def test_environment_variable_and_key_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLLM_STORAGE", str(tmp_path))
    assert parse_config({"train": {"dataset": "d"}}).train.dataset == str(tmp_path / "d")
    assert parse_config({"storage": "/other", "train": {"dataset": "d"}}).train.dataset == "/other/d"
    monkeypatch.delenv("RAYLLM_STORAGE")
    assert parse_config({"train": {"dataset": "d"}}).train.dataset == "d"  # default: the working directory


def test_object_store_root_holds_the_registry_and_refuses_local_only_keys(monkeypatch):
    monkeypatch.delenv("RAYLLM_STORAGE", raising=False)
    cfg = parse_config({"storage": "s3://bucket/team", "serve": {"model": "/models/base"}})
    assert cfg.registry.path == "s3://bucket/team/runs/registry"
    assert cfg.registry.cache_dir == "runs/registry-cache"  # a local cache of remote versions
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "storage": "s3://bucket/team"})
    text = str(err.value)
    for key in ("data.output_dir", "data.tokenizer.path", "model.path", "train.dataset", "tune.output_dir", "serve.state_dir"):
        assert f"{key}: " in text
    assert "train.output_dir: " not in text  # absolute: fine
    # Run dirs and checkpoints may live on the object store (Ray Train persists checkpoints there).
    cfg = parse_config({"storage": "s3://bucket/team", "train": {"dataset": "/data/sft", "output_dir": "runs/train"}})
    assert cfg.train.output_dir == "s3://bucket/team/runs/train"
