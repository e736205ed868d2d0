"""The promotion gate's decisions (with a fake measurement, visibly named so) and the served-perplexity
counting (against a fake OpenAI completions server whose logprobs come from a real tiny torch model)."""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from rayllm.config.gate import GateConfig
from rayllm.eval.served import EndpointError, segments, served_perplexity
from rayllm.registry import Registry, RegistryError, cli
from rayllm.registry import gate
from rayllm.registry.promotion import promote_if_better
from tests.ray.train_fixtures import make_dataset

ENDPOINT = "http://fake-endpoint.invalid"


def make_adapter(folder: Path, val_loss: float, source_run: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (folder / "rayllm_adapter.json").write_text(json.dumps({"rank": 4, "metrics": {"val_loss": val_loss},
                                                            **({"source_run": source_run} if source_run else {})}))
    return folder


def fake_measure(ppl_by_ref: dict[str, float], calls: list | None = None):
    """A stand-in for measuring through an endpoint: returns the figure it is told for each ref."""
    def measure(cfg, ref, scope):
        if calls is not None:
            calls.append((ref, scope))
        value = ppl_by_ref[ref]
        if isinstance(value, Exception):
            raise value
        return {"loss": math.log(value), "ppl": value, "tokens": 123, "sequences": 4}
    return measure


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "reg")
    r.publish("s", make_adapter(tmp_path / "a1", math.log(5.0)))
    r.publish("s", make_adapter(tmp_path / "a2", math.log(4.0)))
    return r


GATE = GateConfig(endpoint=ENDPOINT, dataset="/data/sft")


# -- decisions ----------------------------------------------------------------------------------
def test_judge_tolerance_is_relative_and_inclusive():
    assert gate.judge("s@v1", 10.0, {"ppl": 10.1, "tokens": 1, "sequences": 1}, 0.01, ENDPOINT).passed
    refused = gate.judge("s@v1", 10.0, {"ppl": 10.2, "tokens": 1, "sequences": 1}, 0.01, ENDPOINT)
    assert not refused.passed and refused.rel_diff == pytest.approx(0.02)
    assert "10.2000" in refused.message() and "10.0000" in refused.message() and "likely cause" in refused.message()
    assert "adapter_config.json" in gate.likely_cause(10.0, 12.0) and "other weights" in gate.likely_cause(10.0, 8.0)


def test_trainer_figure_prefers_val_ppl_then_val_loss():
    assert gate.trainer_ppl({"metrics": {"val_ppl": 7.0, "val_loss": 0.0}}, "s@v1") == 7.0
    assert gate.trainer_ppl({"metrics": {"val_loss": math.log(3.0)}}, "s@v1") == pytest.approx(3.0)
    with pytest.raises(RegistryError, match="no finite val_loss"):
        gate.trainer_ppl({"metrics": {"val_loss": float("nan")}}, "s@v1")


def test_gate_admits_within_tolerance_and_records_figures(reg: Registry):
    calls = []
    alias = gate.promote(reg, "s:prod", 1, GATE, measure=fake_measure({"s@v1": 5.02}, calls))
    assert alias.targets[0].version == 1
    assert calls[0][1].dataset == "/data/sft"
    info = reg.show("s:prod")
    assert info["note"]["gate"] == "passed" and info["note"]["verdicts"][0]["served_ppl"] == 5.02
    recorded = reg.show("s@v1")["manifest"]["gate"]["s:prod"]
    assert recorded["passed"] and recorded["trainer_ppl"] == pytest.approx(5.0) and recorded["served_ppl"] == 5.02


def test_gate_refuses_with_both_figures_and_leaves_the_alias(reg: Registry):
    gate.promote(reg, "s:prod", 1, GATE, measure=fake_measure({"s@v1": 5.0}))
    with pytest.raises(gate.GateRefused) as e:
        gate.promote(reg, "s:prod", 2, GATE, measure=fake_measure({"s@v2": 6.5}))
    assert "6.5000" in str(e.value) and "4.0000" in str(e.value) and "likely cause" in str(e.value)
    assert reg.get_alias("s:prod").targets[0].version == 1 and len(reg.get_alias("s:prod").history) == 0
    refused = reg.show("s@v2")["manifest"]["gate"]["s:prod"]
    assert refused["passed"] is False and refused["served_ppl"] == 6.5


def test_skip_is_explicit_and_recorded(reg: Registry):
    with pytest.raises(RegistryError, match="registry.gate.endpoint is empty.*--skip-gate"):
        gate.promote(reg, "s:prod", 1, GateConfig())
    assert reg.get_alias("s:prod") is None
    gate.promote(reg, "s:prod", 1, GateConfig(), skip=True, by="test")
    gate.promote(reg, "s:prod", 2, GATE, measure=fake_measure({"s@v2": 4.0}))
    info = reg.show("s:prod")
    assert info["history"][-1]["note"] == {"by": "test", "gate": "skipped"} and info["note"]["gate"] == "passed"


def test_split_measures_only_versions_new_to_the_alias(reg: Registry):
    gate.promote(reg, "s:prod", 1, GATE, measure=fake_measure({"s@v1": 5.0}))
    calls = []
    gate.promote(reg, "s:prod", {1: 90, 2: 10}, GATE, measure=fake_measure({"s@v2": 4.0}, calls))
    assert [c[0] for c in calls] == ["s@v2"]


def test_endpoint_refusing_the_version_is_a_recorded_refusal_but_an_unreachable_one_is_an_error(reg: Registry):
    other_base = EndpointError("x: HTTP 400: base fingerprint mismatch: adapter was trained on sha256:dead", 400)
    with pytest.raises(gate.GateRefused, match="adapter for another base"):
        gate.promote(reg, "s:prod", 1, GATE, measure=fake_measure({"s@v1": other_base}))
    assert reg.show("s@v1")["manifest"]["gate"]["s:prod"]["served_ppl"] is None
    with pytest.raises(RegistryError, match="gate: x: cannot reach"):
        gate.promote(reg, "s:prod", 2, GATE, measure=fake_measure({"s@v2": EndpointError("x: cannot reach the endpoint")}))
    assert "gate" not in reg.show("s@v2")["manifest"] and reg.get_alias("s:prod") is None


def fake_generation(score_by_ref: dict[str, float], calls: list):
    """A stand-in for generating a task through the endpoint and scoring it: the score it is told per ref."""
    def measure(cfg, ref):
        calls.append(ref)
        return score_by_ref[ref]
    return measure


def test_generation_metric_must_not_fall_below_the_current_version_by_more_than_the_margin(reg: Registry, tmp_path: Path):
    from rayllm.config.eval import GenerationTask

    task = GenerationTask(name="qa", path=str(tmp_path / "qa.jsonl"), metrics=["rougeL"])
    strict = GATE.model_copy(update={"generation": task, "generation_margin": 5.0})
    calls: list = []
    gate.promote(reg, "s:prod", 1, strict, measure=fake_measure({"s@v1": 5.0}), measure_generation=fake_generation({}, calls))
    assert calls == []  # nothing to compare with yet
    scores = {"s@v1": 50.0, "s@v2": 40.0}
    with pytest.raises(gate.GateRefused, match=r"qa/rougeL 40.00 vs s@v1's 50.00 .*generates worse"):
        gate.promote(reg, "s:prod", 2, strict, measure=fake_measure({"s@v2": 4.0}), measure_generation=fake_generation(scores, calls))
    assert reg.get_alias("s:prod").targets[0].version == 1 and calls == ["s@v2", "s@v1"]
    assert reg.show("s@v2")["manifest"]["gate"]["s:prod"]["generation"]["candidate"] == 40.0
    lenient = strict.model_copy(update={"generation_margin": 15.0})
    gate.promote(reg, "s:prod", 2, lenient, measure=fake_measure({"s@v2": 4.0}), measure_generation=fake_generation(scores, calls))
    assert reg.show("s:prod")["note"]["verdicts"][0]["generation"]["current_ref"] == "s@v1"


def test_promote_if_better_moves_through_the_gate(reg: Registry):
    move = lambda alias, v: gate.promote(reg, alias, v, GATE, by="sweep", measure=fake_measure({"s@v1": 5.0, "s@v2": 9.0}))  # noqa: E731
    assert promote_if_better(reg, "s", "prod", 1, move=move)
    with pytest.raises(gate.GateRefused):
        promote_if_better(reg, "s", "prod", 2, move=move)  # better on paper, refused through the endpoint
    assert reg.get_alias("s:prod").targets[0].version == 1


def test_auto_promotion_without_endpoint_is_a_config_error_naming_both_fixes():
    problems = gate.gate_problems("prod", GateConfig(), skip=False)
    assert len(problems) == 1 and "registry.gate.endpoint" in problems[0] and "tune.promote_skip_gate" in problems[0]
    assert gate.gate_problems("prod", GateConfig(), skip=True) == []
    assert gate.gate_problems("prod", GATE, skip=False) == [] and gate.gate_problems(None, GateConfig(), skip=False) == []


def test_sweep_refuses_auto_promotion_without_endpoint_or_skip_before_ray(tmp_path: Path):
    from rayllm.config import ConfigError, parse_config
    from rayllm.tune import sweep

    raw = {"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "lora": {"rank": 4}},
           "train": {"dataset": str(tmp_path / "none")},
           "tune": {"publish_as": "s", "promote_alias": "prod"}, "registry": {"path": str(tmp_path / "reg")}}
    with pytest.raises(ConfigError, match=r"tune.promote_alias \(prod\): registry.gate.endpoint is empty"):
        sweep.run(parse_config(raw))
    raw["tune"]["promote_skip_gate"] = True
    with pytest.raises(ConfigError) as e:  # other problems (no dataset) remain, this one is gone
        sweep.run(parse_config(raw))
    assert "registry.gate.endpoint" not in str(e.value)


def test_gate_config_is_validated():
    from rayllm.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"registry": {"gate": {"tolerance": 2, "endpont": "x"}}})
    text = str(e.value)
    assert "registry.gate.tolerance" in text and "registry.gate.endpont: unknown key" in text
    with pytest.raises(ConfigError, match="generation_metric 'rougeL' is not among generation.metrics"):
        parse_config({"registry": {"gate": {"generation": {"name": "qa", "path": "qa.jsonl", "metrics": ["bleu"]}}}})


# -- what the trainer's figure covers -------------------------------------------------------------
def test_scope_comes_from_the_versions_run_config(tmp_path: Path):
    data = make_dataset(tmp_path / "data", seq_len=32, n_docs=40, val_docs=30, shards=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"dataset": str(data), "micro_batch_size": 2, "num_workers": 2,
                                                               "eval_batches": 2, "document_masking": False}}))
    val_rows = json.loads((data / "manifest.json").read_text())["splits"]["val"]["sequences"]
    scope = gate.scope_for({"source_run": str(run)}, GateConfig(endpoint=ENDPOINT), None, "s@v1")
    assert scope.dataset == str(data) and scope.sequences == min(2, val_rows // 4) * 4 and scope.document_masking is False
    assert gate.scope_for({"source_run": str(run)}, GateConfig(endpoint=ENDPOINT, max_sequences=1), None, "s@v1").sequences == 1
    with pytest.raises(RegistryError, match="registry.gate.dataset"):
        gate.scope_for({"source_run": str(tmp_path / "gone")}, GateConfig(endpoint=ENDPOINT), None, "s@v1")


# -- the CLI --------------------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_promote_needs_an_endpoint_or_the_skip_flag(reg: Registry, capsys):
    root = reg.url(reg.root)
    assert cli.run(_args("--root", root, "promote", "s:prod", "v1")) == 1
    assert "--skip-gate" in capsys.readouterr().err
    assert cli.run(_args("--root", root, "promote", "s:prod", "v1", "--skip-gate")) == 0
    assert "[gate skipped]" in capsys.readouterr().out
    assert cli.run(_args("--root", root, "show", "s:prod")) == 0
    assert "gate skipped (registry promote)" in capsys.readouterr().out


# -- served perplexity, counted as the trainer counts ----------------------------------------------
def test_segments_hold_exactly_the_trainers_target_tokens():
    from rayllm.train.data import PackedSplit

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, size=(6, 24)).astype(np.int32)
    docs = np.sort(rng.integers(0, 4, size=(6, 24)), axis=1).astype(np.int32)
    docs[5, 18:] = -1  # padding
    labels = ids.copy()
    labels[rng.random(ids.shape) < 0.3] = -100  # prompts of SFT rows
    labels[docs < 0] = -100
    split = PackedSplit(ids, labels, docs)
    for masking in (True, False):
        segs = segments(ids, labels, docs, document_masking=masking)
        assert sum(len(s.targets) for s in segs) == split.target_tokens(np.arange(6), masking)


class _FakeCompletionsServer:
    """A fake of the OpenAI /v1/completions route (echo + logprobs only) over a real tiny torch model
    (or several: a dict from the `model` name asked for to the torch model answering)."""

    def __init__(self, model, api_key: str | None = None):
        import torch

        outer = self
        models = model if isinstance(model, dict) else None

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                    return self._send(401, {"error": {"message": "invalid key"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if models is not None and body["model"] not in models:
                    return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
                answering = model if models is None else models[body["model"]]
                with torch.no_grad():
                    logp = torch.log_softmax(answering(torch.tensor([body["prompt"]])).logits[0].float(), -1)
                lps = [None] + [logp[i - 1, t].item() for i, t in enumerate(body["prompt"]) if i > 0]
                self._send(200, {"model": body["model"], "choices": [{"text": "", "logprobs": {"token_logprobs": lps}}]})

            def _send(self, status, data):
                blob = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

        self.bodies: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("mode,masking", [("pretrain", True), ("sft", True), ("pretrain", False)])
def test_served_perplexity_equals_the_trainers_figure(tmp_path: Path, tiny_model, mode, masking):
    import torch

    from rayllm.train.data import PackedSplit
    from rayllm.train.loop import micro_loss

    data = make_dataset(tmp_path / "data", seq_len=32, n_docs=40, val_docs=12, mode=mode, shards=1)
    val = PackedSplit.read(data, "val")
    rows = np.arange(min(6, len(val)))
    with torch.no_grad():  # what loop.evaluate sums, on one worker
        total = micro_loss(tiny_model, val.batch(rows, masking), "cpu").item()
    trainer_loss = total / val.target_tokens(rows, masking)
    server = _FakeCompletionsServer(tiny_model)
    try:
        got = served_perplexity(server.url, "s@v1", data, sequences=len(rows), document_masking=masking, concurrency=3)
    finally:
        server.close()
    assert got["sequences"] == len(rows) and got["tokens"] == val.target_tokens(rows, masking)
    assert got["loss"] == pytest.approx(trainer_loss, rel=1e-5)
    body = server.bodies[0]
    assert body["echo"] is True and body["max_tokens"] == 0 and isinstance(body["prompt"][0], int)


def test_refused_key_and_unreachable_endpoint_fail_in_one_line_quickly(tmp_path: Path, tiny_model):
    data = make_dataset(tmp_path / "data", seq_len=32, n_docs=40, val_docs=12, shards=1)
    server = _FakeCompletionsServer(tiny_model, api_key="right")
    try:
        with pytest.raises(EndpointError, match="refused the API key") as e:
            served_perplexity(server.url, "s@v1", data, api_key="wrong")
        assert e.value.status == 401 and "\n" not in str(e.value)
        assert served_perplexity(server.url, "s@v1", data, sequences=1, api_key="right")["sequences"] == 1
    finally:
        server.close()
    started = time.monotonic()
    with pytest.raises(EndpointError, match="cannot reach") as e:
        served_perplexity(server.url, "s@v1", data, timeout_s=2)
    assert e.value.status is None and time.monotonic() - started < 5


# -- a DPO version: its served DPO loss against the trainer's -----------------------------------------
@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    """A preference dataset, a tiny base and a LoRA on it that moves the policy, and the trainer's own val
    figures for them (`Dpo.evaluate` on one worker, beta 0.3)."""
    import copy

    import torch

    from rayllm.config import LoraConfig, ModelConfig
    from rayllm.config.train import DpoConfig
    from rayllm.data.tokenizer import load_tokenizer
    from rayllm.model import apply_lora, build_model
    from rayllm.train.data import PackedSplit
    from rayllm.train.dpo import METRICS, Dpo, PreferenceSplit, Stats
    from tests.ray.train_fixtures import corpus, train_tokenizer
    from tests.unit.test_dpo import _preference_dataset

    class Engine:  # what Dpo.terms asks of a DeepSpeed engine
        def __init__(self, module):
            self.module = module

        def __call__(self, **kw):
            return self.module(**kw)


    tmp = tmp_path_factory.mktemp("dpo-gate")
    train_tokenizer(corpus(60) + ["be brief and then nothing"], tmp / "tok")
    data = _preference_dataset(tmp, tmp / "tok")
    tok = load_tokenizer(data / "tokenizer")
    base = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2), tok, seed=0).eval()
    policy = apply_lora(copy.deepcopy(base), LoraConfig(rank=4)).eval()
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter: the policy differs from its reference
    val = PreferenceSplit(PackedSplit.read(data, "val"), tok.pad_token_id)
    settings = {"beta": 0.3, "loss_type": "sigmoid", "label_smoothing": 0.0}
    objective, stats = Dpo(DpoConfig(**settings), lora=True), Stats()
    with torch.no_grad():  # Dpo.evaluate on one worker (its all-reduce aside): 3 micro-batches of 2 pairs
        for m in range(3):
            stats.add(*objective.terms(Engine(policy), val.batch(np.arange(2 * m, 2 * m + 2)), "cpu"))
    n, loss, *rest = stats.sums
    trainer = {"val_loss": loss / n, **{f"val_{k}": v / n for k, v in zip(METRICS, rest)}}
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"dataset": str(data), "objective": "dpo", "dpo": settings,
                                                               "micro_batch_size": 2, "num_workers": 1, "eval_batches": 3}}))
    server = _FakeCompletionsServer({"d@v1": policy, "d@v2": policy, "base": base})
    yield data, run, trainer, server
    server.close()


def _publish_dpo(reg: Registry, tmp_path: Path, run: Path, metrics: dict) -> None:
    folder = tmp_path / f"dpo{len(reg.versions('d')) if reg.names() else 0}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (folder / "rayllm_adapter.json").write_text(json.dumps({"rank": 4, "metrics": metrics, "source_run": str(run)}))
    reg.publish("d", folder)


def test_served_dpo_figures_equal_the_trainers(dpo_setup):
    from rayllm.registry import gate_dpo

    data, run, trainer, server = dpo_setup
    scope = gate.scope_for({"source_run": str(run)}, GateConfig(endpoint=server.url), None, "d@v1")
    assert scope.objective == "dpo" and scope.sequences == 6 and scope.dpo["beta"] == 0.3
    got = gate_dpo.measure_served_dpo(GateConfig(endpoint=server.url, concurrency=3), "d@v1", scope)
    assert got["pairs"] == 6 and {b["model"] for b in server.bodies} == {"d@v1", "base"}
    for name in gate_dpo.FIGURES:
        assert got[name] == pytest.approx(trainer[f"val_{name}"], rel=1e-5, abs=1e-6), name
    assert trainer["val_rewards/margins"] != 0  # the adapter really moved the policy: the check is not 0 == 0


def test_a_dpo_version_passes_the_gate_on_its_dpo_loss_and_a_wrong_one_is_refused(dpo_setup, tmp_path: Path, capsys):
    data, run, trainer, server = dpo_setup
    reg = Registry(tmp_path / "reg")
    _publish_dpo(reg, tmp_path, run, trainer)  # what training wrote: v1
    _publish_dpo(reg, tmp_path, run, {**trainer, "val_loss": trainer["val_loss"] + 0.05})  # figures of other weights: v2
    cfg = GateConfig(endpoint=server.url)
    gate.promote(reg, "d:prod", 1, cfg, by="test", say=print)
    verdict = reg.show("d@v1")["manifest"]["gate"]["d:prod"]
    assert verdict["passed"] and verdict["trainer_ppl"] is None and verdict["dpo"]["abs_diff"] < 1e-5
    assert verdict["dpo"]["reference_model"] == "base" and verdict["sequences"] == 6
    assert "gate passed for d@v1: served val DPO loss" in capsys.readouterr().out
    with pytest.raises(gate.GateRefused, match=r"served val DPO loss .*\(0.0500 apart.*'base' is not the base") as e:
        gate.promote(reg, "d:prod", 2, cfg, by="test")
    assert e.value.verdict.dpo["served"]["loss"] == pytest.approx(trainer["val_loss"], abs=1e-5)
    assert reg.get_alias("d:prod").targets[0].version == 1
    with pytest.raises(gate.GateRefused, match="does not serve this registry.*other-base"):  # a reference the endpoint lacks
        gate.promote(reg, "d:prod", 2, cfg.model_copy(update={"reference_model": "other-base"}), by="test")
    assert cli.run(_args("--root", reg.url(reg.root), "show", "d:prod")) == 0
    assert "gate passed (test: v1 served DPO loss" in capsys.readouterr().out


def test_a_dpo_run_measured_on_a_non_preference_dataset_is_refused(tmp_path: Path):
    data = make_dataset(tmp_path / "data", seq_len=32, n_docs=40, val_docs=12, shards=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"dataset": str(data), "objective": "dpo"}}))
    with pytest.raises(RegistryError, match="train.objective dpo, but .* is a 'pretrain' dataset"):
        gate.scope_for({"source_run": str(run)}, GateConfig(endpoint=ENDPOINT), None, "d@v1")
