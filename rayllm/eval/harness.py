"""lm-eval-harness tasks through its Python API (`lm_eval.simple_evaluate`): the `hf` backend for a
local target (an adapter through its `peft` argument), `local-completions` for an endpoint with a
local tokenizer (token-id prompts, `echo` + `logprobs`: loglikelihood tasks), else
`local-chat-completions` (generation tasks). Every backend scores at the same `max_length`, so a
folder and the endpoint serving it give comparable figures. Task files come from `include_path`;
nothing is downloaded."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from rayllm.eval import endpoint
from rayllm.eval.targets import EvalError

if TYPE_CHECKING:
    from rayllm.config import RayllmConfig
    from rayllm.config.eval import HarnessConfig
    from rayllm.eval.targets import Target


def backend(t: Target, h: HarnessConfig, concurrency: int, timeout_s: float) -> tuple[str, dict, bool]:
    """(lm-eval model name, model_args, apply_chat_template) for one target."""
    if t.local:
        args = {"pretrained": t.model_dir, "tokenizer": t.model_dir, "dtype": "float32", "device": "cpu",
                "max_length": h.max_length}
        if t.adapter_dir:
            args["peft"] = t.adapter_dir
        return "hf", args, False
    e = t.endpoint
    args = {"model": e.model, "max_length": h.max_length, "num_concurrent": concurrency, "timeout": int(timeout_s),
            "max_retries": 1, "header": endpoint.headers(e) or None}
    if e.tokenizer:
        return "local-completions", {**args, "base_url": f"{endpoint.base_url(e.url)}/v1/completions", "tokenizer": e.tokenizer,
                                     "tokenizer_backend": "huggingface", "tokenized_requests": True}, False
    return "local-chat-completions", {**args, "base_url": f"{endpoint.base_url(e.url)}/v1/chat/completions",
                                      "tokenizer_backend": None}, True


def flatten(results: dict) -> dict[str, float]:
    """lm-eval's {"task": {"acc,none": x, "acc_stderr,none": s, "alias": ...}} → {"task/acc": x, "task/acc_stderr": s}."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):  # "metric,filter"
                metric, _, flt = key.partition(",")
                out[f"{task}/{metric}" + (f"[{flt}]" if flt and flt != "none" else "")] = float(value)
    return out


def run_harness(cfg: RayllmConfig, targets: list[Target]) -> dict[str, dict[str, float]]:
    """{label: {"task/metric": value}} for every target."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    h = cfg.eval.harness
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=h.include_path) if h.include_path else TaskManager()
    unknown = [t for t in h.tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"eval.harness.tasks: {', '.join(unknown)} not found in {h.include_path or 'lm-eval registry'}")
    out = {}
    for t in targets:
        model, args, chat = backend(t, h, cfg.eval.concurrency, cfg.eval.request_timeout_s)
        # Task files name their data relative to themselves; lm-eval (datasets) opens them relative to
        # the working directory, so the tasks are built and run from their folder.
        with contextlib.chdir(h.include_path) if h.include_path else contextlib.nullcontext():
            results = lm_eval.simple_evaluate(model=model, model_args=args, tasks=list(h.tasks), task_manager=manager,
                                              limit=h.limit, num_fewshot=h.num_fewshot,
                                              batch_size=h.batch_size if t.local else 1,  # endpoints: one prompt per request, num_concurrent in flight
                                              log_samples=False, apply_chat_template=chat, random_seed=0,
                                              numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        out[t.label] = {f"harness/{k}": v for k, v in flatten(results["results"]).items()}
        print(f"[rayllm] eval: {t.label}: lm-eval {model}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[t.label].items()), flush=True)
    return out
