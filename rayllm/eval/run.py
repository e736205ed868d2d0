"""`rayllm eval CONFIG`: every target scored on the same data, side by side.

Read top to bottom: check the config's inputs and resolve the targets (registry refs pinned to
exact versions, endpoints reached and their keys tried) before any Ray resource is taken →
perplexity of each local target → generation tasks (local targets on a Ray Data pool of vLLM
engines, endpoints over HTTP) scored with sacrebleu / rouge-score / SQuAD EM-F1 → lm-eval-harness
tasks → the report (table, eval.json, eval.csv, registry manifests).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rayllm.config import ConfigError
from rayllm.eval import endpoint, tasks
from rayllm.eval.targets import EvalError, Target, check_inputs, resolve_targets

if TYPE_CHECKING:
    from rayllm.config import RayllmConfig


def say(message: str) -> None:
    print(f"[rayllm] eval: {message}", flush=True)


def prepare(cfg: RayllmConfig, source: str = "config") -> list[Target]:
    """The targets, every one checked; ConfigError / EvalError before anything heavy starts."""
    problems = check_inputs(cfg)
    if problems:
        raise ConfigError(source, problems)
    targets = resolve_targets(cfg)
    for i, t in enumerate(targets):
        if t.endpoint is not None:
            endpoint.check(t.endpoint, cfg.eval.connect_timeout_s, f"eval target {t.label!r}")
    return targets


def run_perplexity(cfg: RayllmConfig, targets: list[Target]) -> dict[str, dict]:
    from rayllm.eval.perplexity import perplexity

    e, out = cfg.eval, {}
    for t in targets:
        t0 = time.perf_counter()
        if not t.local:  # through the endpoint, as the promotion gate measures it (token-id prompts, echo, logprobs)
            out[t.label] = _served_perplexity(e, t)
        else:
            try:
                out[t.label] = perplexity(t.model_dir, e.dataset, split=e.split, adapter=t.adapter_dir, max_sequences=e.max_sequences,
                                          batch_size=e.batch_size, document_masking=e.document_masking, dtype=e.dtype).as_dict()
            except (ValueError, FileNotFoundError) as exc:
                raise EvalError(f"eval target {t.label!r}: perplexity: {exc}") from None
        p = out[t.label]
        say(f"{t.label}: {e.split} loss {p['loss']:.4f} ppl {p['ppl']:.4f} over {p['tokens']} tokens in {p['sequences']} "
            f"sequences ({time.perf_counter() - t0:.1f} s)")
    return out


def _served_perplexity(e, t: Target) -> dict:
    from rayllm.eval.served import served_perplexity

    if e.split != "val":
        raise EvalError(f"eval target {t.label!r}: an endpoint's perplexity is measured on the val split; set eval.split: val")
    key = endpoint.headers(t.endpoint).get("Authorization", "").removeprefix("Bearer ") or None
    try:
        return served_perplexity(t.endpoint.url, t.endpoint.model, e.dataset, sequences=e.max_sequences,
                                 document_masking=e.document_masking, api_key=key, timeout_s=e.request_timeout_s,
                                 concurrency=e.concurrency)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise EvalError(f"eval target {t.label!r}: perplexity through {t.endpoint.url}: {exc}") from None


def run_generation(cfg: RayllmConfig, targets: list[Target], out_dir: Path, address: str | None) -> tuple[dict, dict]:
    """({label: {task/metric: value}}, {task: rows, bad rows, generated tokens}); outputs kept in generations/."""
    from rayllm.eval.generate import generate_local, stop_ids
    from rayllm.model import load_tokenizer

    e = cfg.eval
    task_rows = {}
    for task in e.generation:
        found = tasks.read_rows(task.path, task.max_rows)
        say(found.summary(task.path))
        if not found.rows:
            raise EvalError(f"eval.generation task {task.name!r}: {task.path} has no valid rows ({found.summary(task.path)})")
        task_rows[task.name] = found
    answers: dict[tuple[str, str, int], dict] = {}  # (label, task, row index) -> {"text", "tokens"}

    groups: dict[str, list[Target]] = {}  # local targets by base model: one engine per base
    for t in targets:
        if t.local:
            groups.setdefault(t.model_dir, []).append(t)
    if groups:
        from rayllm.ray_session import ray_session

        with ray_session(address, dashboard=False):
            for model_dir, group in groups.items():
                tok = load_tokenizer(model_dir)
                stops = stop_ids(tok)
                items = []
                for task in e.generation:
                    rendered = [tasks.prompt_ids(tok, row, task.chat) for row in task_rows[task.name].rows]
                    for t in group:
                        items += [{"key": json.dumps([t.label, task.name, i]), "prompt_ids": ids, "max_new_tokens": task.max_new_tokens,
                                   "stop_ids": stops, "lora": t.adapter_dir or ""} for i, ids in enumerate(rendered)]
                t0 = time.perf_counter()
                got = generate_local(model_dir, items, e.engine)
                n_tok = sum(g["tokens"] for g in got.values())
                say(f"{len(items)} generations for {', '.join(t.label for t in group)}: {n_tok} tokens in "
                    f"{time.perf_counter() - t0:.1f} s")
                answers.update({tuple(json.loads(k)): v for k, v in got.items()})
    for t in targets:
        if t.local:
            continue
        for task in e.generation:
            reqs = []
            for row in task_rows[task.name].rows:
                messages = tasks.messages_of(row, task.chat)
                reqs.append({"messages": messages} if messages else {"prompt": row.prompt})
                reqs[-1]["max_tokens"] = task.max_new_tokens
            got = endpoint.generate(t.endpoint, reqs, concurrency=e.concurrency, connect_timeout_s=e.connect_timeout_s,
                                    request_timeout_s=e.request_timeout_s, where=f"eval target {t.label!r}")
            failed = [g["error"] for g in got if "error" in g]
            if len(failed) == len(got):
                raise EvalError(f"eval target {t.label!r}: every request of task {task.name!r} failed; first: {failed[0]}")
            if failed:
                say(f"{t.label}: {len(failed)} of {len(got)} requests of {task.name} failed (scored as empty); first: {failed[0]}")
            answers.update({(t.label, task.name, i): g for i, g in enumerate(got)})

    figures: dict[str, dict] = {t.label: {} for t in targets}
    details: dict[str, dict] = {}
    (out_dir / "generations").mkdir(parents=True, exist_ok=True)
    for task in e.generation:
        rows = task_rows[task.name].rows
        refs = [r.references for r in rows]
        with open(out_dir / "generations" / f"{task.name}.jsonl", "w") as f:
            for t in targets:
                outs = [answers[(t.label, task.name, i)].get("text", "") for i in range(len(rows))]
                for row, out in zip(rows, outs):
                    f.write(json.dumps({"target": t.label, "line": row.index, "output": out, "references": row.references}) + "\n")
                for metric, value in tasks.score(task.metrics, outs, refs).items():
                    figures[t.label][f"{task.name}/{metric}"] = value
        found = task_rows[task.name]
        details[task.name] = {"path": task.path, "rows": len(rows), "bad_rows": sum(found.bad.values()),
                              "bad_by_reason": dict(found.bad), "bad_samples": found.samples}
    return figures, details


def run(cfg: RayllmConfig, address: str | None = None, source: str = "config") -> dict:
    """Evaluate every target of `cfg.eval`; returns the report written to eval.json."""
    from rich.console import Console

    from rayllm.eval import report

    e = cfg.eval
    targets = prepare(cfg, source)
    say(f"{len(targets)} target(s): " + ", ".join(f"{t.label} ({t.kind})" for t in targets))
    out_dir = Path(e.output_dir) / e.name
    figures: dict[str, dict] = {t.label: {} for t in targets}
    details: dict = {"tasks": {}}
    if e.dataset is not None:
        details["perplexity"] = {"dataset": str(e.dataset), "split": e.split, "max_sequences": e.max_sequences,
                                 "document_masking": e.document_masking}
        for label, p in run_perplexity(cfg, targets).items():
            figures[label].update({"val_loss" if e.split == "val" else "loss": p["loss"],
                                   "ppl": p["ppl"], "ppl_tokens": p["tokens"]})
    if e.generation:
        gen, details["tasks"] = run_generation(cfg, targets, out_dir, address)
        for label, values in gen.items():
            figures[label].update(values)
    if e.harness is not None:
        from rayllm.eval.harness import run_harness

        for label, values in run_harness(cfg, targets).items():
            figures[label].update(values)
    written = report.write(out_dir, e.name, targets, figures, details)
    Console().print(report.table(figures, f"rayllm eval {e.name}"))
    if e.record_in_registry and any(t.registry_ref for t in targets):
        from rayllm.registry import Registry

        refs = report.record_in_registry(Registry(cfg.registry.path), targets, figures, e.name,
                                         {"report": str(out_dir / report.REPORT_JSON)})
        say(f"figures recorded in the manifests of {', '.join(refs)}")
    from rayllm.report import build

    say(f"wrote {out_dir / report.REPORT_JSON}, {out_dir / report.REPORT_CSV} and {build(out_dir)}")
    return written
