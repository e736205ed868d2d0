"""`train:` — Ray Train + DeepSpeed: workers, ZeRO, optimisation, checkpoints, spikes, logging."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from rayllm.config.base import Section


class SpikeConfig(Section):
    enabled: bool = Field(True, description="Roll back to the last checkpoint when the loss spikes or turns NaN/inf.")
    threshold: float = Field(3.0, gt=1.0, description="A spike is a step loss above threshold × the running median of the window.")
    window: int = Field(20, ge=3, description="Steps in the running-median window; no ratio test until it is full (NaN/inf always count).")
    lr_factor: float = Field(0.5, gt=0.0, lt=1.0, description="After a rollback the learning rate is multiplied by this.")
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks allowed in one run; one more spike fails the run.")


class DpoConfig(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model; for ipo the regularisation τ (DPOConfig: beta).")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: the DPO loss; ipo: IPO's squared loss on per-token mean log-ratios (DPOConfig: loss_type).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="sigmoid only: the probability that a preference label is wrong (conservative DPO, cDPO); 0: plain DPO.")
    precompute_reference: bool = Field(False, description="Compute the reference log-probs of every pair once before step 1; a full fine-tune then frees its reference copy before training (DPOConfig: precompute_ref_log_probs).")

    @model_validator(mode="after")
    def _smoothing(self) -> "DpoConfig":
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type sigmoid (conservative DPO); set it to 0 for ipo")
        return self


class RewardConfig(Section):
    kind: Literal["exact_match", "regex", "length_penalty", "function"] = Field(..., description="exact_match: 1 when the completion equals the row's reference answer after normalisation (case, spaces, a trailing period), else 0; regex: 1 when `pattern` matches (re.search), else 0; length_penalty: -(tokens over target_tokens) / max_new_tokens; function: `function`(prompt, completion, row) -> float.")
    weight: float = Field(1.0, description="The reward's factor in the total a completion is scored with.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the metrics (reward/<name>, reward_errors/<name>); empty: the kind, or the function's name.")
    pattern: str | None = Field(None, description="regex only: the pattern searched for in the completion.")
    function: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="function only: import path `package.module:function`, called with (prompt, completion, row); row holds the prompt's `prompt`, `answer` and the completion's `completion_tokens`.")
    target_tokens: int = Field(0, ge=0, description="length_penalty only: completions up to this many tokens are not penalised.")

    @model_validator(mode="after")
    def _fields(self) -> "RewardConfig":
        problems = []
        if (self.kind == "regex") != (self.pattern is not None):
            problems.append("pattern is for kind regex, and kind regex needs a pattern")
        if (self.kind == "function") != (self.function is not None):
            problems.append("function (module:function) is for kind function, and kind function needs one")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                problems.append(f"pattern {self.pattern!r} is not a regular expression ({exc})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.function.rsplit(":", 1)[1] if self.function else self.kind


class RolloutConfig(Section):
    num_actors: int = Field(1, ge=1, description="Ray actors holding one vLLM engine each; an iteration's prompts are split between them.")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs each rollout actor reserves (on 2 cores: 1, beside 2 workers × 0.5).")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs each rollout actor reserves (0 on CPU).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="vLLM's dtype; auto: bf16 where the hardware runs it fast, else fp32.")
    kv_cache_gib: int = Field(1, ge=1, description="vLLM's KV cache on CPU in GiB (VLLM_CPU_KVCACHE_SPACE, a whole number).")
    max_model_len: int = Field(512, ge=16, description="Longest prompt + completion the engine takes.")
    enforce_eager: bool = Field(True, description="No torch.compile/CUDA graphs: the engine starts in seconds, not minutes.")
    weight_sync: Literal["auto", "object_store", "collective"] = Field(
        "auto", description="How a full fine-tune's weights reach the engines each iteration: object_store — rank 0 puts them into Ray's "
                            "object store once and every actor reads them; collective — rank 0 broadcasts them over a torch.distributed "
                            "group of its own with the actors (NCCL when each actor holds whole GPUs and rank 0 one, else gloo through "
                            "CPU); auto: collective when actor_gpus >= 1, else object_store. LoRA runs send adapter folders either way."
    )


class GrpoConfig(Section):
    group_size: int = Field(4, ge=2, description="Completions sampled per prompt; advantages are normalised within each group (GRPOConfig: num_generations).")
    max_new_tokens: int = Field(32, ge=1, description="Longest completion (GRPOConfig: max_completion_length).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (GRPOConfig: temperature).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (GRPOConfig: top_p).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the probability ratio (GRPOConfig: epsilon).")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference (the base, adapter disabled), k3 estimator; 0 skips the reference forward (GRPOConfig: beta).")
    updates_per_batch: int = Field(1, ge=1, description="Optimizer passes over each batch of rollouts, μ (GRPOConfig: num_iterations).")
    rewards: list[RewardConfig] = Field(default_factory=list, description="Reward functions (at least one for objective grpo); a completion's reward is their weighted sum.")
    eval_prompts: int = Field(16, ge=0, description="Held-out val prompts answered greedily at every eval_every and at the end (val_reward); 0: none.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="The vLLM rollout actors.")

    @model_validator(mode="after")
    def _names(self) -> "GrpoConfig":
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"reward names must differ (got {labels}); give each a name")
        return self


class TrainConfig(Section):
    objective: Literal["lm", "dpo", "grpo"] = Field("lm", description="lm: next-token cross-entropy on pretrain or sft data (seq2seq for an encoder-decoder model); dpo: direct preference optimisation on a preference dataset (data.mode: preference); grpo: online RL, prompts (and reference answers) from an sft dataset, completions from vLLM rollout actors, rewards from code (LoRA, or full fine-tuning with ZeRO <= 2 and beta 0).")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="DPO settings, used when objective is dpo.")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="GRPO settings, used when objective is grpo; one iteration is one step (train.max_steps iterations).")
    dataset: str = Field(..., description="Prepared dataset folder (the output_dir of `rayllm prepare`, holding manifest.json).")
    output_dir: str = Field("runs/train", description="Run directory root, a shared disk or an object-store URI (s3://bucket/runs); the run lives in output_dir/run_name. Rerunning the same command resumes.")
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of the run (a folder name).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs each worker holds (fractions let 2 workers share a 2-core machine with the driver).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; false: CPU with gloo and DeepSpeed's CPU accelerator.")
    bind_cores: bool = Field(True, description="CPU training: pin each rank's compute thread to its own share of the cores it may use, split evenly among the ranks on its node by local rank (what DeepSpeed's launcher does with --bind_cores_to_rank); false: the OS moves the threads between cores. Ignored with use_gpu.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass (TrainingArguments: per_device_train_batch_size).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step (TrainingArguments: same name).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps of the whole run; the LR schedule spans them (TrainingArguments: max_steps).")
    stop_at_step: int | None = Field(None, ge=1, description="Stop with a checkpoint at this step although the schedule spans max_steps; rerun with a larger value (or none) to go on.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW (TrainingArguments: learning_rate).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices; norms and biases get none (TrainingArguments: weight_decay).")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (TrainingArguments: adam_beta1, adam_beta2).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon (TrainingArguments: adam_epsilon).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (TrainingArguments: warmup_steps).")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Schedule after warmup, from transformers' get_scheduler (TrainingArguments: lr_scheduler_type)."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables (TrainingArguments: max_grad_norm).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Where ZeRO keeps optimizer states (stage ≥ 1; nvme needs use_gpu).")
    offload_param: Literal["none", "cpu", "nvme"] = Field("none", description="Where ZeRO-3 keeps parameters (stage 3 only; nvme needs use_gpu).")
    nvme_path: str | None = Field(None, description="Local NVMe folder for nvme offload (GPU machines only).")
    bucket_size: int | None = Field(None, ge=10_000, description="DeepSpeed reduce/all-gather bucket in elements; empty: trainable params, capped at 50M.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, about 1/3 more compute.")
    ingest: Literal["ray_data", "files"] = Field(
        "ray_data", description="How the prepared shards reach the workers: ray_data — Ray Data reads them (read tasks reserving no CPU) and streams "
                                "each split into every worker at start; files — each worker reads the parquet files itself with pyarrow. "
                                "Same rows and order either way."
    )
    document_masking: bool = Field(True, description="Packed sequences: restart positions and mask attention at each document start (from doc_ids).")
    memory_per_worker_gib: float | None = Field(None, gt=0, description="Memory the plan may use per worker; empty: GPU memory, or on CPU the free RAM / num_workers.")
    eval_every: int = Field(50, ge=1, description="Validation loss/perplexity every N steps, at every checkpoint and at the end (TrainingArguments: eval_steps).")
    eval_batches: int = Field(8, ge=1, description="Validation micro-batches per worker per evaluation (fewer if the val split is smaller).")
    save_every: int = Field(50, ge=1, description="Checkpoint every N steps and at the end (TrainingArguments: save_steps).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (TrainingArguments: save_total_limit).")
    logging_steps: int = Field(10, ge=1, description="Metrics written to metrics.jsonl (and W&B) every N steps (TrainingArguments: logging_steps).")
    seed: int = Field(0, description="Seed for model init, data order and dropout (TrainingArguments: seed).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the latest checkpoint before the run fails.")
    spike: SpikeConfig = Field(default_factory=SpikeConfig, description="Loss-spike detection and rollback.")
    report_to: list[Literal["jsonl", "wandb"]] = Field(default_factory=lambda: ["jsonl"], description="Metric sinks (TrainingArguments: report_to).")
    wandb_project: str = Field("rayllm", description="W&B project.")
    wandb_group: str | None = Field(None, description="W&B group (a sweep sets it).")
    wandb_mode: Literal["online", "offline", "disabled"] = Field("offline", description="W&B mode; offline needs no network.")

    @model_validator(mode="after")
    def _combos(self) -> "TrainConfig":
        problems = []
        if self.offload_param != "none" and self.zero_stage != 3:
            problems.append(f"offload_param={self.offload_param} needs zero_stage 3 (got {self.zero_stage}); set zero_stage: 3 or offload_param: none")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            problems.append("offload_optimizer needs zero_stage >= 1; set zero_stage: 1, 2 or 3, or offload_optimizer: none")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) != "nvme":
                continue
            if not self.use_gpu:
                problems.append(f"{key}: nvme needs use_gpu: true (DeepSpeed's NVMe offload swaps GPU memory through async I/O); "
                                f"on CPU set {key}: cpu or none")
            elif not self.nvme_path:
                problems.append(f"{key}: nvme needs nvme_path (a local NVMe folder)")
        if self.warmup_steps > self.max_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}); lower warmup_steps")
        if self.stop_at_step is not None and self.stop_at_step > self.max_steps:
            problems.append(f"stop_at_step ({self.stop_at_step}) exceeds max_steps ({self.max_steps}); drop it or lower it")
        problems += self._grpo_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _grpo_problems(self) -> list[str]:
        if self.objective != "grpo":
            # Compared with the defaults, not by presence: a dumped config (run folder, sweep trial) holds the section.
            return [f"grpo: settings are for objective grpo (objective is {self.objective}); drop them or set objective: grpo"] \
                if self.grpo != GrpoConfig() else []
        problems, batch = [], self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers
        if not self.grpo.rewards:
            problems.append("objective grpo needs grpo.rewards, e.g. [{kind: exact_match}] (the row's reference answer)")
        if batch % self.grpo.group_size:
            problems.append(f"objective grpo: micro_batch_size × gradient_accumulation_steps × num_workers = {batch} completions "
                            f"per iteration is not a multiple of grpo.group_size ({self.grpo.group_size}); change one of them")
        if self.grpo.updates_per_batch > 1 and self.lr_scheduler_type in ("cosine", "linear"):
            problems.append(f"grpo.updates_per_batch {self.grpo.updates_per_batch} steps the optimizer that many times per iteration, so a "
                            f"{self.lr_scheduler_type} schedule over max_steps would end early; use lr_scheduler_type: constant or "
                            "constant_with_warmup, or updates_per_batch: 1")
        return problems
