"""The promotion gate on the real stack: a LoRA adapter fine-tuned (PEFT, a few steps) on a prepared
dataset, its trainer's figure computed with the trainer's own loss and token count, published to a
registry as trained (twice), and with an adapter_config.json that is not the one trained (lora_alpha
×4, so the served weights differ), plus an adapter for another base; one Ray Serve + vLLM app
serves the registry, and the gate measures each version through it (perplexity, and once the
optional generation comparison against the alias's current version).

Token-id prompts make a tokenizer or chat template inside the published folder irrelevant to the
measured figure (vLLM scores the ids it is given); what the gate catches through the endpoint is
served weights that differ from the trained ones, which the alpha change stands for.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.ray.serve_fixtures import cached_world, serve_app
from tests.ray.train_fixtures import make_dataset

pytestmark = pytest.mark.slow

VAL_ROWS = 8


@dataclass
class Setup:
    url: str
    registry: object
    dataset: Path
    trainer_ppl: float
    dpo_trainer: dict


def _fine_tune(base: Path, dataset: Path, out: Path) -> float:
    """A rank-8 LoRA trained a few steps on the train split; returns its val loss over the first VAL_ROWS
    rows exactly as loop.evaluate computes it (micro_loss summed, divided by target_tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayllm.train.data import PackedSplit
    from rayllm.train.loop import micro_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=modules, lora_dropout=0.0))
    train, val = PackedSplit.read(dataset, "train"), PackedSplit.read(dataset, "val")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        rows = np.arange(8 * step, 8 * step + 8) % len(train)
        loss = micro_loss(model, train.batch(rows), "cpu") / train.target_tokens(rows)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    rows = np.arange(VAL_ROWS)
    with torch.no_grad():
        val_loss = micro_loss(model, val.batch(rows), "cpu").item() / val.target_tokens(rows)
    model.save_pretrained(out)
    return val_loss


def _meta(folder: Path, fingerprint: str, val_loss: float) -> None:
    from rayllm.registry.fingerprint import METADATA_FILE

    meta = {"base_fingerprint": fingerprint, "rank": 8, "alpha": 16, "config_hash": "gate-test",
            "metrics": {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_sequences": VAL_ROWS}}
    (folder / METADATA_FILE).write_text(json.dumps(meta))


def _dpo_version(root: Path, base: Path, adapter: Path, fingerprint: str) -> tuple[Path, dict]:
    """The fine-tuned adapter published as if a DPO run had trained it: a preference dataset in the base's
    chat rendering, the run's config.yaml (objective dpo, beta 0.2) and the val figures Dpo computes for
    this adapter against its disabled self (the reference), over the first 6 pairs as the trainer evaluates."""
    import torch
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayllm.config.train import DpoConfig
    from rayllm.data.tokenizer import load_tokenizer
    from rayllm.registry.fingerprint import METADATA_FILE
    from rayllm.train.data import PackedSplit
    from rayllm.train.dpo import METRICS, Dpo, PreferenceSplit, Stats
    from tests.unit.test_dpo import _preference_dataset

    data = _preference_dataset(root, base)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()

    class Engine:  # what Dpo.terms asks of a DeepSpeed engine
        module = policy

        def __call__(self, **kw):
            return policy(**kw)

    settings = {"beta": 0.2, "loss_type": "sigmoid", "label_smoothing": 0.0}
    objective, stats = Dpo(DpoConfig(**settings), lora=True), Stats()
    val = PreferenceSplit(PackedSplit.read(data, "val"), load_tokenizer(data / "tokenizer").pad_token_id)
    with torch.no_grad():
        for m in range(3):
            stats.add(*objective.terms(Engine(), val.batch(np.arange(2 * m, 2 * m + 2)), "cpu"))
    n, loss, *rest = stats.sums
    figures = {"val_loss": loss / n, **{f"val_{k}": v / n for k, v in zip(METRICS, rest)}}
    run = root / "dpo-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"dataset": str(data), "objective": "dpo", "dpo": settings,
                                                               "micro_batch_size": 2, "num_workers": 1, "eval_batches": 3}}))
    folder = root / "dpo"
    shutil.copytree(adapter, folder)
    meta = {"base_fingerprint": fingerprint, "rank": 8, "config_hash": "gate-test-dpo", "metrics": figures, "source_run": str(run)}
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder, figures


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _shared_ray):
    from transformers import AutoTokenizer

    from rayllm.config.serve import ServeConfig
    from rayllm.model import base_fingerprint
    from rayllm.registry.store import Registry

    root = tmp_path_factory.mktemp("gate")
    world = cached_world()
    dataset = make_dataset(root / "data", seq_len=64, n_docs=120, val_docs=40, mode="sft", shards=1,
                           tokenizer=AutoTokenizer.from_pretrained(world.base))
    good = root / "good"
    val_loss = _fine_tune(world.base, dataset, good)
    _meta(good, base_fingerprint(world.base), val_loss)
    bad = root / "bad"
    shutil.copytree(good, bad)
    peft_cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**peft_cfg, "lora_alpha": 4 * peft_cfg["lora_alpha"]}))
    alien = root / "alien"
    shutil.copytree(good, alien)
    _meta(alien, "sha256:0000000000000000000000000000dead", val_loss)

    registry = Registry(str(root / "registry"))
    for folder in (good, bad, alien, good):
        registry.publish("g", str(folder))  # g@v1 as trained, g@v2 another alpha, g@v3 another base, g@v4 = g@v1
    dpo_folder, dpo_trainer = _dpo_version(root, world.base, good, base_fingerprint(world.base))
    registry.publish("d", str(dpo_folder))  # d@v1: judged on its DPO figures
    cfg = ServeConfig(model=str(world.base), served_model_name="base", dtype="float32", max_model_len=128, cpu_threads=1,
                      max_num_seqs=16, max_loras=2, max_cpu_loras=4, max_lora_rank=8, replica_cpus=1,
                      registry_refresh_s=0.5)
    _shared_ray.ensure()
    with serve_app(cfg, str(root / "registry")) as url:
        yield Setup(url, registry, dataset, math.exp(val_loss), dpo_trainer)


def _gate(setup: Setup, **kw):
    from rayllm.config.gate import GateConfig

    return GateConfig(endpoint=setup.url, dataset=str(setup.dataset), **kw)


@pytest.mark.timeout(180, func_only=True)
def test_gate_admits_the_version_as_trained(setup):
    from rayllm.registry import gate

    started = time.monotonic()
    alias = gate.promote(setup.registry, "g:prod", 1, _gate(setup), by="test")
    took = time.monotonic() - started
    assert alias.targets[0].version == 1
    verdict = setup.registry.show("g@v1")["manifest"]["gate"]["g:prod"]
    assert verdict["passed"] and verdict["sequences"] == VAL_ROWS and verdict["tokens"] > 0
    # the endpoint's perplexity of the correct adapter is the trainer's, well inside the 1 % tolerance: in fp32,
    # vLLM-CPU and torch differ by ~1e-3 per token logprob (test_serve_stack), 7e-4 in the mean here
    assert verdict["trainer_ppl"] == pytest.approx(setup.trainer_ppl)
    assert abs(verdict["served_ppl"] - setup.trainer_ppl) / setup.trainer_ppl < 3e-3, verdict
    note = setup.registry.show("g:prod")["note"]
    assert note["gate"] == "passed" and note["verdicts"][0]["served_ppl"] == verdict["served_ppl"]
    print(f"gate measured {verdict['tokens']} tokens in {took:.1f} s: served {verdict['served_ppl']:.5f}, "
          f"trainer {verdict['trainer_ppl']:.5f}")


@pytest.mark.timeout(180, func_only=True)
def test_gate_refuses_other_weights_and_another_base_leaving_the_alias(setup, capsys):
    import argparse

    from rayllm.config.registry import RegistryConfig
    from rayllm.registry import cli, gate

    if setup.registry.get_alias("g:prod") is None:
        gate.promote(setup.registry, "g:prod", 1, _gate(setup), by="test")
    before = setup.registry.show("g:prod")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--root", setup.registry.url(setup.registry.root), "promote", "g:prod", "v2"])
    assert cli.run(args, RegistryConfig(gate=_gate(setup))) == 1  # `rayllm registry promote g:prod v2`
    err = capsys.readouterr().err.strip()
    verdict = setup.registry.show("g@v2")["manifest"]["gate"]["g:prod"]
    assert not verdict["passed"] and verdict["served_ppl"] > verdict["trainer_ppl"] * 1.01
    print(f"refused g@v2: served {verdict['served_ppl']:.4f} vs trainer {verdict['trainer_ppl']:.4f}")
    assert f"{verdict['served_ppl']:.4f}" in err and f"{verdict['trainer_ppl']:.4f}" in err and "likely cause" in err, err
    with pytest.raises(gate.GateRefused, match="adapter for another base"):
        gate.promote(setup.registry, "g:prod", 3, _gate(setup), by="test")
    after = setup.registry.show("g:prod")
    assert after["targets"] == before["targets"] and after["history"] == before["history"]  # alias untouched


@pytest.mark.timeout(180, func_only=True)
def test_gate_compares_generation_with_the_current_version(setup):
    from rayllm.config.eval import GenerationTask
    from rayllm.registry import gate

    task = GenerationTask(name="qa", path=str(Path(__file__).parents[2] / "jobs" / "data" / "eval" / "qa.jsonl"),
                          max_new_tokens=8, metrics=["rougeL"])
    gate.promote(setup.registry, "g:gen", 1, _gate(setup), by="test")
    gate.promote(setup.registry, "g:gen", 4, _gate(setup, generation=task), by="test")  # same weights as v1
    g = setup.registry.show("g@v4")["manifest"]["gate"]["g:gen"]["generation"]
    assert g["current_ref"] == "g@v1" and g["candidate"] == pytest.approx(g["current"])  # greedy, same weights
    assert setup.registry.get_alias("g:gen").targets[0].version == 4


@pytest.mark.timeout(300, func_only=True)
def test_rayllm_eval_scores_a_version_from_its_folder_and_through_the_endpoint_alike(setup, tmp_path):
    """`rayllm eval` with g@v1 twice: from the registry (torch, lm-eval's hf backend) and as the live endpoint
    serves it (token-id prompts; lm-eval's local-completions): the same perplexity and the same lm-eval score."""
    from rayllm.config import parse_config
    from rayllm.eval.run import run

    root = Path(__file__).resolve().parents[2]
    cfg = parse_config({"registry": {"path": setup.registry.root}, "eval": {
        "name": "ab", "output_dir": str(tmp_path), "dataset": str(setup.dataset), "max_sequences": VAL_ROWS,
        "targets": [{"ref": "g@v1"}, {"endpoint": {"url": setup.url, "model": "g@v1", "tokenizer": str(cached_world().base)},
                                      "label": "served"}],
        "harness": {"tasks": ["rayllm_tiny_cloze"], "include_path": str(root / "jobs/data/eval/harness"), "max_length": 128},
    }})
    figures = run(cfg)["metrics"]
    local, served = figures["g@v1"], figures["served"]
    assert served["ppl_tokens"] == local["ppl_tokens"] > 0
    assert served["ppl"] == pytest.approx(local["ppl"], rel=3e-3)  # vLLM-CPU vs torch in fp32
    assert served["harness/rayllm_tiny_cloze/acc"] == local["harness/rayllm_tiny_cloze/acc"]
    assert (tmp_path / "ab" / "report.html").is_file()


@pytest.mark.timeout(180, func_only=True)
def test_gate_admits_a_dpo_version_on_its_dpo_loss(setup):
    """Through vLLM: the candidate's and the served base's log-probs of each val pair's responses give the
    trainer's DPO loss and rewards (the base with the adapter disabled is the LoRA's reference)."""
    from rayllm.config.gate import GateConfig
    from rayllm.registry import gate

    started = time.monotonic()
    gate.promote(setup.registry, "d:prod", 1, GateConfig(endpoint=setup.url), by="test")
    took = time.monotonic() - started
    verdict = setup.registry.show("d@v1")["manifest"]["gate"]["d:prod"]
    served, trainer = verdict["dpo"]["served"], setup.dpo_trainer
    print(f"DPO gate: {verdict['sequences']} pairs in {took:.1f} s: served loss {served['loss']:.5f} vs trainer "
          f"{trainer['val_loss']:.5f}, margins {served['rewards/margins']:.4f} vs {trainer['val_rewards/margins']:.4f}")
    assert verdict["passed"] and verdict["sequences"] == 6 and verdict["dpo"]["reference_model"] == "base"
    assert trainer["val_rewards/margins"] != 0  # the adapter is not its own reference: the comparison means something
    assert verdict["dpo"]["abs_diff"] < 2e-3
    assert served["rewards/margins"] == pytest.approx(trainer["val_rewards/margins"], abs=2e-3)
