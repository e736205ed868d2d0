"""ServeConfig validation, dtype choice, engine arguments (parsed by vLLM's own parser), adapter checks."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from rayllm.config import ConfigError, parse_config
from rayllm.config.serve import ServeConfig
from rayllm.serve.compat import AdapterIncompatible, check_adapter
from rayllm.serve.vllm_engine import engine_cli_args, resolve_dtype


def test_serve_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ConfigError) as e:
        parse_config({"serve": {"model": "m", "adapters": {"../x": "/p", "Upper": "/q"}, "max_loras": 8,
                                "max_cpu_loras": 4, "bogus": 1}})
    text = str(e.value)
    assert "serve.bogus: unknown key" in text and "../x" in text and "Upper" in text
    with pytest.raises(ConfigError, match=r"max_cpu_loras \(4\) must be >= max_loras \(8\)"):
        parse_config({"serve": {"model": "m", "max_loras": 8, "max_cpu_loras": 4}})
    with pytest.raises(ValidationError):
        ServeConfig(model="m", served_model_name="has space")
    assert ServeConfig(model="m").kv_cache_gib == 1


def test_every_serve_field_has_a_description():
    missing = [n for n, f in ServeConfig.model_fields.items() if not f.description]
    assert missing == []


@pytest.mark.parametrize("requested,gpu,bf16,expected", [
    ("auto", False, False, "float32"),
    ("auto", False, True, "bfloat16"),
    ("float32", False, True, "float32"),
    ("auto", True, False, "auto"),
    ("bfloat16", True, False, "bfloat16"),
])
def test_resolve_dtype(requested, gpu, bf16, expected):
    assert resolve_dtype(requested, gpu, bf16) == expected


def test_bf16_on_a_cpu_without_it_is_an_error():
    with pytest.raises(ValueError, match="no bf16 instructions"):
        resolve_dtype("bfloat16", on_gpu=False, bf16_ok=False)


def test_engine_args_parse_with_vllms_own_parser(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cfg = ServeConfig(model=str(tmp_path), served_model_name="tiny", max_model_len=256, max_loras=2, max_cpu_loras=5,
                      max_lora_rank=32, max_num_seqs=7, seed=3)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(cfg, "float32", False, "{{ x }}"))
    ea = AsyncEngineArgs.from_cli_args(args)
    assert (ea.model, ea.dtype, ea.max_model_len, ea.enable_lora, ea.max_loras, ea.max_cpu_loras, ea.max_lora_rank,
            ea.max_num_seqs, ea.seed, ea.enforce_eager) == (str(tmp_path), "float32", 256, True, 2, 5, 32, 7, 3, True)
    assert args.served_model_name == ["tiny"] and args.chat_template == "{{ x }}"
    assert ea.distributed_executor_backend == "uni"  # on CPU: no worker process beside a polling engine core


def test_cpu_engine_runs_in_the_engine_core_with_threads_by_dtype(tmp_path, monkeypatch):
    from rayllm.serve.vllm_engine import cpu_engine_env

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    env = cpu_engine_env(ServeConfig(model=str(tmp_path), replica_cpus=2.5, kv_cache_gib=3), "bfloat16")
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "3"}
    assert cpu_engine_env(ServeConfig(model=str(tmp_path)), "float32")["OMP_NUM_THREADS"] == "4"  # every core
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_engine_env(ServeConfig(model=str(tmp_path)), "bfloat16")["OMP_NUM_THREADS"] == "1"
    assert cpu_engine_env(ServeConfig(model=str(tmp_path), cpu_threads=4), "float32")["OMP_NUM_THREADS"] == "4"
    mp = ServeConfig(model=str(tmp_path), cpu_executor="mp")
    assert cpu_engine_env(mp, "float32") == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert engine_cli_args(mp, "float32", False, None)[-2:] == ["--distributed-executor-backend", "mp"]
    assert "--distributed-executor-backend" not in engine_cli_args(mp, "float32", True, None)  # a GPU keeps vLLM's choice


def test_several_llm_replicas_default_to_the_replicas_own_cpus(tmp_path, monkeypatch):
    """Replicas that may share a node compute with their reservation's cores, not each with every core."""
    from rayllm.serve.vllm_engine import cpu_engine_env

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    threads = lambda dtype, **kw: cpu_engine_env(ServeConfig(model=str(tmp_path), **kw), dtype)["OMP_NUM_THREADS"]
    assert threads("float32", replica_cpus=4) == "16" and threads("bfloat16", replica_cpus=4) == "15"  # one replica: the node
    assert threads("float32", num_replicas=4, replica_cpus=4) == "4" and threads("bfloat16", num_replicas=4, replica_cpus=4) == "3"
    assert threads("float32", num_replicas=2, replica_cpus=2.5) == "2"  # whole cores of the reservation
    assert threads("float32", num_replicas=2, replica_cpus=0.5) == "1" and threads("bfloat16", num_replicas=2) == "1"
    assert threads("float32", replica_cpus=4, autoscaling={"min_replicas": 1, "max_replicas": 3}) == "4"
    assert threads("float32", replica_cpus=4, autoscaling={"min_replicas": 1, "max_replicas": 1}, topology="split") == "16"
    assert threads("float32", num_replicas=4, replica_cpus=64) == "16"  # never more than the cores it may run on
    assert threads("float32", num_replicas=4, replica_cpus=4, cpu_threads=8) == "8"  # an explicit count wins


def test_the_ingress_replica_binds_the_endpoint_port_on_a_ray_rayllm_starts(tmp_path, monkeypatch):
    from rayllm.config import RayllmConfig
    from rayllm.serve.deploy import binds_directly, local_ray_env, proxy_port

    def cfg(**serve):
        return RayllmConfig.model_validate({"serve": {"model": str(tmp_path), "port": 8123, **serve}})

    env = local_ray_env(cfg())
    assert env == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8123",
                   "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "8124", "RAY_SERVE_PORT_QUARANTINE_S": "0",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    assert binds_directly(cfg(topology="single")) and binds_directly(cfg(ingress_replicas=1))
    # several ingress replicas share serve.port only through the proxy; so does a prefix
    for other in (cfg(ingress_replicas=2), cfg(route_prefix="/llm")):
        assert not binds_directly(other) and "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in local_ray_env(other)
    assert local_ray_env(cfg(direct_ingress=False)) == {}
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", raising=False)
    assert proxy_port(cfg()) == 8123  # a cluster's Ray: the proxy keeps the endpoint's port
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "8123")
    assert proxy_port(cfg()) != 8123 and proxy_port(cfg(ingress_replicas=2)) == 8123


def _adapter(tmp_path, r=8, meta=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r, "target_modules": ["v_proj", "q_proj"]}))
    if meta is not None:
        (tmp_path / "rayllm_adapter.json").write_text(json.dumps(meta))
    return tmp_path


def test_check_adapter(tmp_path):
    facts = check_adapter(_adapter(tmp_path, meta={"base_fingerprint": "fp", "rank": 8}), "fp", 16)
    assert facts.rank == 8 and facts.target_modules == ("q_proj", "v_proj")
    with pytest.raises(AdapterIncompatible, match="base fingerprint mismatch"):
        check_adapter(tmp_path, "other", 16)
    with pytest.raises(AdapterIncompatible, match="exceeds this server's max_lora_rank 4"):
        check_adapter(tmp_path, "fp", 4)
    with pytest.raises(AdapterIncompatible, match="rank mismatch"):
        check_adapter(_adapter(tmp_path, r=8, meta={"rank": 4}), None, 16)
    assert check_adapter(_adapter(tmp_path / "plain"), "fp", 16).base_fingerprint is None  # a plain PEFT folder
    head = _adapter(tmp_path / "head")
    (head / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(AdapterIncompatible, match="lm_head are not served"):
        check_adapter(head, None, 16)


def test_replica_options_fixed_or_autoscaled_and_gpu_resources():
    from rayllm.config import ConfigError, parse_config
    from rayllm.serve.app import replica_options

    fixed = parse_config({"serve": {"model": "/m", "num_replicas": 3, "limits": {"max_queued_requests": 7, "retry_after_s": 2}}}).serve
    opts = replica_options(fixed)
    backpressure = opts.pop("backpressure_config")
    assert opts == {"max_ongoing_requests": 256, "num_replicas": 3, "max_queued_requests": 7}
    assert (backpressure.status_code, backpressure.retry_after_s) == (503, 2)
    auto = parse_config({"serve": {"model": "/m", "replica_gpus": 1, "autoscaling": {"min_replicas": 0, "max_replicas": 4}}}).serve
    opts = replica_options(auto)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 16.0,
                                          "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
                                          "metrics_interval_s": 10.0, "look_back_period_s": 30.0}
    assert auto.replica_gpus == 1
    with pytest.raises(ConfigError) as e:
        parse_config({"serve": {"model": "/m", "autoscaling": {"upscale_delay_s": -1, "downscale_delay_s": -2, "metrics_interval_s": 0}}})
    assert all(k in str(e.value) for k in ("upscale_delay_s", "downscale_delay_s", "metrics_interval_s"))
    with pytest.raises(ConfigError, match="look_back_period_s"):
        parse_config({"serve": {"model": "/m", "autoscaling": {"metrics_interval_s": 2, "look_back_period_s": 2}}})


def test_autoscaling_keys_reach_serve_as_serve_reads_them():
    from ray.serve.config import AutoscalingConfig as ServeAutoscaling

    from rayllm.config import parse_config
    from rayllm.serve.app import replica_options

    keys = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 4,
            "metrics_interval_s": 0.5, "look_back_period_s": 2}
    serve_cfg = parse_config({"serve": {"model": "/m", "autoscaling": keys}}).serve
    theirs = ServeAutoscaling(**replica_options(serve_cfg)["autoscaling_config"])
    assert {k: getattr(theirs, k) for k in keys} == keys and theirs.initial_replicas == 1
    with pytest.raises(ConfigError, match="max_replicas"):
        parse_config({"serve": {"model": "/m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match="topology single"):
        parse_config({"serve": {"model": "/m", "topology": "single", "autoscaling": {}}})


def test_a_seq2seq_base_is_refused_for_serving(tmp_path):
    from transformers import T5Config

    from rayllm.config import ConfigError, parse_config
    from rayllm.serve.app import servable_config

    T5Config(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64).save_pretrained(tmp_path)
    cfg = parse_config({"serve": {"model": str(tmp_path)}})
    with pytest.raises(ConfigError, match="encoder-decoder"):
        servable_config(cfg.serve)


def test_auto_topology_is_single_unless_the_config_needs_routing(tmp_path):
    def topology(**kw):
        return ServeConfig(model=str(tmp_path), **kw).effective_topology

    assert topology() == "single"
    assert topology(num_replicas=2) == topology(ingress_replicas=2) == topology(autoscaling={}) == "split"
    assert topology(topology="split") == "split" and topology(topology="single") == "single"
