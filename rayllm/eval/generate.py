"""Generation for local targets on Ray: a Ray Data `map_batches` actor pool whose actors each hold
one offline vLLM engine (`vllm.LLM`) for a base model, with LoRA enabled when adapters are among the
targets, so `botchan@v1`, `botchan@v2` and their base share one engine start.

Why not `ray.data.llm` (Ray 2.60's `vLLMEngineProcessorConfig` + `build_processor`): on a CPU-only
machine it waits forever without an error. Unless given a placement group, its engine stage asks for
one `{"GPU": 1, "CPU": 1}` bundle per replica (ray/llm/_internal/batch/stages/vllm_engine_stage.py),
which a cluster without GPUs never grants; with `placement_group_config={"bundles": [{"CPU": 1}]}`,
16 prompts × 8 tokens on 2 CPUs still produced nothing in 5 minutes (not traced; a likely cause is
the engine's placement group holding CPU its own preprocessing, tokenize and detokenize stages
then wait for). Besides, its chat-template and tokenize stages render prompts with their own code,
where rayllm renders through `rayllm.chat` (the ids SFT trained on), and its dynamic LoRA loading
wants a remote URI, not the local verified folders a registry version resolves to. So: a plain
`map_batches` actor pool holding the same engine, with Ray's ordinary CPU accounting, fed token ids
rendered on the driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayllm.config.eval import EngineConfig


class VLLMGenerator:
    """A Ray Data actor: one vLLM engine, greedy generation of a batch of rendered prompts."""

    def __init__(self, model_dir: str, engine: dict, lora: bool):
        from rayllm.vllm_offline import offline_llm

        lora_args: dict[str, Any] = {"enable_lora": True, "max_lora_rank": engine["max_lora_rank"], "max_loras": 4} if lora else {}
        self.llm = offline_llm(model_dir, dtype=engine["dtype"], dtype_key="eval.engine.dtype", kv_cache_gib=engine["kv_cache_gib"],
                               max_model_len=engine["max_model_len"], enforce_eager=engine["enforce_eager"],
                               in_process=engine["in_process"], seed=0, **lora_args)
        self.lora_ids: dict[str, int] = {}

    def _lora(self, path: str):
        if not path:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = self.lora_ids.setdefault(path, len(self.lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in batch["prompt_ids"]]
        params = [SamplingParams(temperature=0.0, max_tokens=int(n), stop_token_ids=[int(t) for t in stop], skip_special_tokens=True)
                  for n, stop in zip(batch["max_new_tokens"], batch["stop_ids"])]
        loras = [self._lora(str(p)) for p in batch["lora"]]
        outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return {"key": batch["key"], "output": np.array([o.outputs[0].text for o in outs], dtype=object),
                "output_tokens": np.array([len(o.outputs[0].token_ids) for o in outs], dtype=np.int64)}


def stop_ids(tokenizer) -> list[int]:
    """EOS and the chat template's end-of-turn token (ChatML's <|im_end|>) when the vocabulary has it."""
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return sorted(i for i in ids if i is not None)


def generate_local(model_dir: str, items: list[dict], engine: EngineConfig) -> dict[str, dict]:
    """items: {"key", "prompt_ids", "max_new_tokens", "stop_ids", "lora"} → {key: {"text", "tokens"}},
    on a Ray Data actor pool of `engine.num_actors` vLLM engines for `model_dir` (Ray must be up)."""
    import ray

    lora = any(item["lora"] for item in items)
    ds = ray.data.from_items(items)
    out = ds.map_batches(
        VLLMGenerator,
        fn_constructor_kwargs={"model_dir": model_dir, "engine": engine.model_dump(), "lora": lora},
        batch_size=engine.batch_size,
        concurrency=engine.num_actors,
        num_cpus=engine.actor_cpus,
        num_gpus=engine.actor_gpus,
        batch_format="numpy",
    )
    return {r["key"]: {"text": str(r["output"]), "tokens": int(r["output_tokens"])} for r in out.take_all()}
