"""`rayllm demo`: the life cycle on an embedded local Ray with a tiny model, in one go.

Each stage writes the config it runs into the work dir (so it can be rerun by hand with the
matching verb) and ends with a line saying how long it took and where its artifacts are. Stages
that are already done are reused. The console shows rayllm's lines; everything else (Ray, the
workers, the libraries) goes to the log file the CLI names (`--verbose`: all on the console).
"""

from __future__ import annotations

import argparse
import json
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


def _instruction_set(corpus: Path, out: Path) -> Path:
    """A small instruction set from the corpus itself: continue a line of the novel."""
    lines = [l.strip() for l in corpus.read_text(encoding="utf-8-sig").splitlines() if len(l.split()) >= 6]
    rows = [
        {"messages": [{"role": "user", "content": f"Continue the story: {a}"}, {"role": "assistant", "content": b}]}
        for a, b in zip(lines[:-1:2], lines[1::2])
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def stage_prepare(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.data.corpora import botchan_path
    from rayllm.data.prepare import run

    corpus = botchan_path()
    pretrain = _write_config(workdir, "prepare_pretrain", {"data": {
        "inputs": [str(corpus)], "text_unit": "line", "output_dir": str(workdir / "data" / "pretrain"),
        "seq_len": 128, "val_fraction": 0.05, "tokenizer": {"vocab_size": 4096},
    }})
    run(load_config(pretrain).data, address=address)
    sft = _write_config(workdir, "prepare_sft", {"data": {
        "inputs": [str(_instruction_set(corpus, workdir / "raw" / "instructions.jsonl"))], "mode": "sft",
        "output_dir": str(workdir / "data" / "sft"), "seq_len": 128, "val_fraction": 0.05,
        "tokenizer": {"path": str(workdir / "data" / "pretrain" / "tokenizer")},
    }})
    run(load_config(sft).data, address=address)
    return f"datasets {workdir / 'data' / 'pretrain'}, {workdir / 'data' / 'sft'}"


def _train_section(workdir: Path, dataset: str, run_name: str, steps: int, lr: float) -> dict:
    return {
        "dataset": str(workdir / "data" / dataset), "output_dir": str(workdir / "train"), "run_name": run_name,
        "num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "micro_batch_size": 4,
        "max_steps": steps, "learning_rate": lr, "warmup_steps": max(1, steps // 10),
        "eval_every": max(1, steps // 4), "save_every": max(1, steps // 2), "logging_steps": max(1, steps // 10),
        "eval_batches": 4, "report_to": ["jsonl"],
    }


TINY_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 256}
LORA = {"rank": 8, "alpha": 32}


def stage_pretrain(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.train.launch import run

    path = _write_config(workdir, "pretrain", {"model": TINY_MODEL, "train": _train_section(workdir, "pretrain", "pretrain", 60, 2e-3)})
    result = run(load_config(path), address=address)
    return f"model {result.get('model_dir')} (val loss {_figure(result.get('val_loss'))})"


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _base_model(workdir: Path) -> str:
    return str(workdir / "train" / "pretrain" / "model")


def stage_finetune(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.train.launch import run

    path = _write_config(workdir, "finetune", {
        "model": {"path": _base_model(workdir), "lora": LORA},
        "train": _train_section(workdir, "sft", "finetune", 30, 2e-3),
    })
    result = run(load_config(path), address=address)
    return f"LoRA adapter {result.get('adapter_dir')} (val loss {_figure(result.get('val_loss'))})"


def stage_sweep(workdir: Path, address: str | None) -> str:
    from rayllm.config import load_config
    from rayllm.tune.sweep import run

    path = _write_config(workdir, "sweep", {
        "model": {"path": _base_model(workdir), "lora": LORA},
        "train": _train_section(workdir, "sft", "sweep", 24, 1e-3),
        "tune": {"learning_rate": {"type": "grid", "values": [3e-4, 2e-3, 1e-2]}, "grace_period": 6, "reduction_factor": 2,
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
    from rayllm.dtypes import bf16_supported
    from rayllm.registry import Registry
    from rayllm.serve.deploy import deploy, undeploy

    registry = Registry(str(workdir / "registry"))
    candidate = registry.resolve("botchan", verify=False)  # the sweep's newest publish
    path = _write_config(workdir, "serve", {
        # float32: the 1M-parameter model costs nothing in fp32, and the gate's served perplexity stays within
        # its tolerance of the trainer's everywhere. (bf16 serving on AMX CPUs, where vLLM's worker once died
        # with SIGILL at its first generation, works since rayllm.dtypes.allow_amx runs in every vLLM process.)
        "serve": {"model": _base_model(workdir), "served_model_name": "base", "max_model_len": 256,
                  "preload_adapters": [candidate.ref], "port": port, "dtype": "float32"},
        "registry": {"path": str(workdir / "registry"),
                     "gate": {"endpoint": f"http://127.0.0.1:{port}", "dataset": str(workdir / "data" / "sft"),
                              # where `auto` means bf16 the trainer evaluates in bf16 (the endpoint in fp32), and
                              # the figures may drift further apart than fp32 with fp32 (~1e-3)
                              "tolerance": 0.03 if bf16_supported(False) else 0.01}},
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
        question = [{"role": "user", "content": "Continue the story: I went to the school"}]
        for model in ("base", "botchan:prod"):
            reply = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
            out.say(f"{model:>14} → [{reply.model}] {reply.choices[0].message.content!r}")
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
