"""GRPO rollouts through rayllm's Ray actors against vLLM's offline `LLM.generate`, side by side in one
run, and the share of a GRPO iteration spent outside generation and training.

  (b) vLLM offline: `vllm.LLM(..., enable_lora=True)` in this process, one `LLM.generate` over all
      prompts with the adapter, n = group_size samples per prompt, logprobs=0
  (c) rayllm: `rayllm.train.rollout.RolloutPool` (one actor holding the same engine, in-process
      engine core) on a private local Ray, the same prompts, adapter and SamplingParams, called
      from this process as rank 0 calls it
  (d) a real GRPO run (`train.objective: grpo`, the tiny test task of tests/ray/test_train_grpo.py,
      2 workers + 1 rollout actor) for --iterations: the mean of its `time/other_fraction`

(b) and (c) time the generate call alone (the engine already started: an engine starts once per
run, an iteration generates every time); figures are generated tokens per second from each side's
own outputs. Every timed side is guarded (_quiet.py): the cores used by processes outside this
benchmark are printed beside each figure with the CPU capability; ratios come from clean rounds only.
Goals (issue 17): c/b >= 0.9; other fraction <= 10 %.

    .venv/bin/python benchmarks/rl_rollout.py --quick          # the 2-layer test model, 16 prompts x 4 x 16 tokens
    .venv/bin/python benchmarks/rl_rollout.py --model smollm2 --prompts 16 --group 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _quiet import WAIT_LIMIT, cpu_capability, note, ratio, window  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def task_prompts(tokenizer, n: int) -> list[list[int]]:
    """n prompts of the shipped sum task, rendered with the generation prompt as GRPO's prompts are."""
    from rayllm.chat import render_chat
    from rayllm.data.verifiable import problems

    return [render_chat(tokenizer, r["messages"][:2], add_generation_prompt=True).input_ids for r in problems(n, seed=1, high=30)]


def sampling(max_new: int, stops: list[int]) -> dict:
    return {"temperature": 1.0, "top_p": 1.0, "max_tokens": max_new, "stop_token_ids": stops, "skip_special_tokens": True}


def side_vllm(model_dir: str, adapter: str, dtype: str, ids, n: int, params: dict, max_model_len: int) -> tuple[int, float]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0, disable_log_stats=True,
              enable_lora=True, max_lora_rank=64, max_loras=1)
    lora = LoRARequest("policy", 1, adapter)
    sp = SamplingParams(n=n, logprobs=0, **params)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], sp, lora_request=lora, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return tokens, gen_s


def side_rayllm(model_dir: str, adapter: str, dtype: str, ids, n: int, params: dict, max_model_len: int) -> tuple[int, float]:
    import ray

    from rayllm.config.train import RolloutConfig
    from rayllm.train.rollout import RolloutPool

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        cfg = RolloutConfig(actor_cpus=os.cpu_count(), dtype=dtype, max_model_len=max_model_len)
        pool = RolloutPool(model_dir, cfg, max_lora_rank=64, seed=0)
        info = {"name": "policy-v0", "id": 1, "path": adapter, "version": 0}
        ray.get(pool.actors[0].__ray_ready__.remote())  # the engine started: time the generate call alone
        t0 = time.perf_counter()
        out = pool.generate(ids, info, params, n)
        gen_s = time.perf_counter() - t0
        pool.close()
        return sum(len(c["ids"]) for g in out["groups"] for c in g), gen_s
    finally:
        ray.shutdown()


def side_iteration(iterations: int) -> float:
    """Mean time/other_fraction of a real GRPO run on the tiny test task."""
    import ray

    from tests.ray.test_train_grpo import grpo_config, tiny_task
    from tests.ray.train_fixtures import read_metrics, train

    tmp = Path(tempfile.mkdtemp(prefix="rl-bench-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base, dataset = tiny_task(tmp)
        train(grpo_config(base, dataset, tmp, iterations, eval_prompts=0))
    finally:
        ray.shutdown()
    steps = [r for r in read_metrics(tmp / "grpo") if "time/other_fraction" in r]
    return sum(r["time/other_fraction"] for r in steps[1:]) / max(len(steps) - 1, 1)  # the first holds engine warm-up


def adapter_for(model_dir: str, out: Path) -> str:
    """A rank-8 LoRA on every projection with random (non-zero) weights, so the LoRA path does real work."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or `smollm2` (default: the 2-layer test model, built once and cached)")
    ap.add_argument("--quick", action="store_true", help="the 2-layer test model, 16 prompts x 4 samples x 16 tokens")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (group_size)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=12, help="(d): GRPO iterations of the real run; 0 skips it")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--wait-quiet", type=float, default=WAIT_LIMIT)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.group, args.max_tokens = 16, 4, 16
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # both sides: the engine core in the generating process

    from rayllm.dtypes import resolve_dtype
    from rayllm.eval.generate import stop_ids
    from rayllm.model import load_tokenizer, resolve_base

    if args.model is None:
        from tests.ray.serve_fixtures import cached_world

        world = cached_world()
        model_dir, adapter = str(world.base), str(world.adapters["a"])
    else:
        model_dir = str(resolve_base(args.model))
        adapter = adapter_for(model_dir, Path(tempfile.mkdtemp(prefix="rl-bench-adapter-")))
    dtype = resolve_dtype("auto", use_gpu=False)
    tok = load_tokenizer(model_dir)
    ids, params = task_prompts(tok, args.prompts), sampling(args.max_tokens, stop_ids(tok))
    cap = cpu_capability()
    print(f"model {model_dir}; {args.prompts} prompts x {args.group} samples x {args.max_tokens} new tokens, temperature 1, "
          f"LoRA rank 8, {dtype}; {os.cpu_count()} cores, CPU capability {cap}", flush=True)
    sides = {"b": ("vLLM offline LLM.generate", side_vllm), "c": ("rayllm RolloutPool (Ray actor)", side_rayllm)}
    figures: dict[str, list] = {k: [] for k in sides}
    for r in range(args.rounds):
        for key, (label, side) in sides.items():
            with window(args.wait_quiet) as w:
                n, gen_s = side(model_dir, adapter, dtype, ids, args.group, params, args.max_model_len)
            f = w.figure(n / gen_s, seconds=gen_s, tokens=n)
            figures[key].append(f)
            print(f"round {r + 1} ({key}) {label:32s}: {gen_s:6.2f} s {f.value:8,.1f} tok/s ({n} tokens); {note(f, cap)}", flush=True)
    print(f"ratio (generated tokens/s, generate call, CPU capability {cap}): c/b = {ratio(figures['c'], figures['b']).text()}")
    if args.iterations:
        with window(args.wait_quiet) as w:
            other = side_iteration(args.iterations)
        f = w.figure(other)
        print(f"(d) GRPO iteration time outside generation and training: {100 * other:.1f} % "
              f"(mean over iterations 2..{args.iterations}); {note(f, cap)}")
        print(json.dumps({"other_fraction": other, "contended": f.contended}))


if __name__ == "__main__":
    main()
