"""`eval:` — `rayllm eval`: perplexity, generation tasks and lm-eval-harness tasks over several targets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rayllm.config.base import Section

METRICS = ("bleu", "rougeL", "exact_match", "f1")


class EndpointConfig(Section):
    url: str = Field(..., pattern=r"^https?://", description="Base URL of an OpenAI-compatible server (http://host:port, with or without /v1).")
    model: str = Field(..., min_length=1, description="The request's `model`: the base name, an adapter, name@vN or name:alias.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (sent as a Bearer token); empty: no key.")
    tokenizer: str | None = Field(None, description="Local tokenizer folder of the served model: lm-eval then scores through local-completions with token-id prompts (loglikelihood tasks); empty: local-chat-completions (generation tasks only).")


class TargetConfig(Section):
    path: str | None = Field(None, description="A plain HF model folder, a PEFT adapter folder (with rayllm_adapter.json), or a run directory (its model/ or adapter/ is used).")
    ref: str | None = Field(None, description="A registry ref: name@vN, name:alias (each version it points at is evaluated) or name (the newest).")
    endpoint: EndpointConfig | None = Field(None, description="A live OpenAI-compatible endpoint.")
    base: str | None = Field(None, description="Base model folder of an adapter (default: base_model in its rayllm_adapter.json).")
    label: str | None = Field(None, description="Column name in the report (default: the ref, the folder name, or endpoint model).")

    @model_validator(mode="after")
    def _one(self) -> "TargetConfig":
        given = [k for k in ("path", "ref", "endpoint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a target names exactly one of path, ref, endpoint (got {', '.join(given) or 'none'}); "
                             "e.g. {path: runs/train/run} or {ref: botchan@v1}")
        if self.ref is not None:
            from rayllm.registry.names import AdapterRef, InvalidNameError

            try:
                AdapterRef.parse(self.ref)
            except InvalidNameError as e:
                raise ValueError(str(e)) from None
        return self


class GenerationTask(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Task name (prefix of its metrics in the report).")
    path: str = Field(..., description="jsonl file: one object per line with `prompt` (text) or `messages` ([{role, content}]) and `reference` (text) or `references` (list of texts).")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per row (greedy).")
    metrics: list[Literal["bleu", "rougeL", "exact_match", "f1"]] = Field(default_factory=lambda: list(METRICS), description="bleu (sacrebleu corpus BLEU), rougeL (rouge-score F-measure, mean), exact_match and f1 (SQuAD normalisation, best over references); all ×100.")
    chat: bool = Field(True, description="Render `prompt` rows as one user message with the chat template (rayllm.chat); false: the prompt text is the completion prompt as is. `messages` rows always use the template.")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many valid rows (first ones); empty: all.")

    @field_validator("metrics")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"at least one metric: {', '.join(METRICS)}")
        return v


class HarnessConfig(Section):
    tasks: list[str] = Field(..., min_length=1, description="lm-eval task (or group) names, found in include_path or lm-eval's own registry (those must not need a download).")
    include_path: str | None = Field(None, description="Folder of lm-eval task YAML files (and their local data) added to lm-eval's task registry.")
    limit: int | None = Field(None, ge=1, description="Examples per task at most (lm-eval `limit`); empty: all.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (lm-eval `num_fewshot`); empty: the task's default.")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size of the hf backend (endpoints get one prompt per request, eval.concurrency at once).")
    max_length: int = Field(2048, ge=16, description="Context length lm-eval scores with, for every backend (the same for a folder and an endpoint, so their figures compare).")


class EngineConfig(Section):
    num_actors: int = Field(1, ge=1, description="vLLM engine actors in the Ray Data actor pool that generates for a local target.")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs each engine actor reserves (vLLM's own threads are not counted by Ray).")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs each engine actor reserves (1 on a GPU node).")
    batch_size: int = Field(64, ge=1, description="Rows per Ray Data batch handed to an engine (vLLM batches inside it).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype; auto: bf16 where the CPU/GPU supports it, else fp32.")
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + generation in tokens.")
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank the engine accepts.")
    enforce_eager: bool = Field(True, description="Skip graph compilation (about 1 min instead of 3.5 min engine start on CPU).")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE).")
    in_process: bool = Field(True, description="Run vLLM's engine core and worker inside the actor (no extra processes; faster start on CPU); false: vLLM's own processes.")


class EvalConfig(Section):
    name: str = Field("eval", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of this evaluation; the report lives in output_dir/name.")
    output_dir: str = Field("runs/eval", description="Where eval.json and eval.csv are written (under output_dir/name).")
    targets: list[TargetConfig] = Field(..., min_length=1, description="What is evaluated, side by side on the same data.")
    dataset: str | None = Field(None, description="Prepared dataset (output_dir of `rayllm prepare`) whose split gives perplexity; empty: no perplexity.")
    split: Literal["train", "val"] = Field("val", description="Split of `dataset` scored.")
    max_sequences: int | None = Field(None, ge=1, description="Score the first this many sequences of the split (the trainer's val_ppl covers eval_batches × micro_batch_size × num_workers); empty: all.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass when scoring perplexity.")
    document_masking: bool = Field(True, description="As train.document_masking: positions restart and targets across a document start are dropped (keep equal to the run's for the same figure).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the perplexity forward passes (auto: bf16 where the hardware has it).")
    generation: list[GenerationTask] = Field(default_factory=list, description="Generation tasks scored with BLEU/ROUGE-L/EM/F1.")
    harness: HarnessConfig | None = Field(None, description="lm-eval-harness tasks through its Python API (hf backend for folders, local-completions / local-chat-completions for endpoints).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines that generate for local targets.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once per endpoint target.")
    connect_timeout_s: float = Field(5.0, gt=0, description="An endpoint that does not accept a connection within this many seconds fails the target.")
    request_timeout_s: float = Field(120.0, gt=0, description="Longest wait for one endpoint response.")
    record_in_registry: bool = Field(True, description="Write each registry version's figures into its manifest (under `eval`).")

    @model_validator(mode="after")
    def _something(self) -> "EvalConfig":
        if self.dataset is None and not self.generation and self.harness is None:
            raise ValueError("nothing to evaluate: set dataset (perplexity), generation tasks, or harness tasks")
        labels = [t.label for t in self.targets if t.label]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"target labels must differ: {', '.join(dup)} used twice")
        names = [g.name for g in self.generation]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"generation task names must differ: {', '.join(dup)} used twice")
        return self
