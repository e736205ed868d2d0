"""`rayllm demo`: the life cycle on an embedded local Ray with a tiny model, in one go.

Each stage writes the config it runs into the work dir (so it can be rerun by hand with the
matching verb) and prints where its artifacts are. Stages that are already done are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import yaml


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


def stage_prepare(workdir: Path, address: str | None) -> None:
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


STAGES: dict[str, Callable[[Path, str | None], None]] = {"prepare": stage_prepare}


def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    names = args.stages.split(",") if args.stages else list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        print(f"rayllm demo: unknown stage(s) {unknown}; available: {', '.join(STAGES)}")
        return 2
    from rayllm.ray_session import ray_session

    with ray_session(args.address):
        for name in names:
            started = time.time()
            print(f"\n=== demo stage: {name} ===", flush=True)
            STAGES[name](workdir, args.address)
            print(f"=== {name} done in {time.time() - started:.0f} s ===", flush=True)
    print(f"\ndemo finished; artifacts under {workdir}")
    return 0
