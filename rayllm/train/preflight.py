"""Everything checked before a Ray resource is taken: the config's cross-section rules, the dataset,
the base model, the batching and the memory plan. All problems are reported at once (ConfigError)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from rayllm.config import ConfigError
from rayllm.dtypes import cpu_capability
from rayllm.train import dpo, grpo
from rayllm.train import plan as P
from rayllm.train.batching import Batching, batching, check_batching, eval_micro_batches
from rayllm.train.data import read_manifest
from rayllm.train.zero import bucket_elements


# Test hook: lets the QLoRA path run on CPU (bitsandbytes' CPU backend) so CPU machines exercise it.
QLORA_ON_CPU_ENV = "RAYLLM_QLORA_ON_CPU"


@dataclass
class Preflight:
    manifest: dict
    batching: Batching
    dtype: str
    cpu_capability: str
    base_dir: str | None  # HF folder of the pretrained base (GGUF already converted); None: new model
    shape: P.Shape
    settings: P.Settings
    plan: P.Plan
    capacity: tuple[float | None, float | None]  # (device, host) bytes per worker
    eval_micro_batches: int
    local: bool  # Ray runs on this machine: its free RAM bounds the workers

    @property
    def fits(self) -> bool:
        return P.fits(self.plan, self.settings, self.capacity)


def available_memory() -> float:
    """Bytes of RAM available on this machine (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    import psutil

    return float(psutil.virtual_memory().available)


def capacity_for(train_cfg, local: bool):
    """(device, host) memory per worker as a function of the worker count; None where it cannot be
    known here (a remote cluster, or a GPU the driver does not have)."""
    host_total = available_memory() if local else None
    device = None
    if train_cfg.use_gpu:
        import torch

        device = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if train_cfg.memory_per_worker_gib:  # the user's figure wins: device memory on GPU, RAM on CPU
        given = train_cfg.memory_per_worker_gib * P.GIB
        return lambda workers: (given, host_total / workers if host_total else None) if train_cfg.use_gpu else (None, given)
    return lambda workers: (device, host_total / workers if host_total else None)


def hf_config_of(model_cfg, base_dir: str | None, tokenizer) -> dict:
    """config.json of the base, or the HF config a new model of `model.arch` would get."""
    from rayllm.model import new_model_config

    if base_dir:
        return json.loads((Path(base_dir) / "config.json").read_text())
    return new_model_config(model_cfg, tokenizer).to_dict()


def _shape(model_cfg, hf_config: dict) -> P.Shape:
    from rayllm.model import lora_targets

    lora = model_cfg.lora
    rank, targets = (lora.rank, tuple(lora_targets(lora, hf_config))) if lora else (0, ())
    return P.shape_from_hf(hf_config, rank, targets)


def _arch_problems(cfg, hf_config: dict, manifest: dict, problems: list[str]) -> None:
    """Seq2seq needs prompt/answer data and a T5-family model; LoRA targets must exist in the model."""
    from rayllm.model import SEQ2SEQ_TYPES, default_lora_targets, is_seq2seq

    m = cfg.model
    if is_seq2seq(hf_config):
        if hf_config.get("model_type") not in SEQ2SEQ_TYPES:
            problems.append(f"model.path: encoder-decoder model_type {hf_config.get('model_type')!r} is not supported; "
                            f"seq2seq training takes {', '.join(SEQ2SEQ_TYPES)}")
        if manifest.get("mode") != "sft":
            problems.append(f"train.dataset: a seq2seq (encoder-decoder) model trains on prompt → answer pairs, but the dataset "
                            f"was prepared with mode {manifest.get('mode')!r}; prepare it with data.mode: sft")
    if m.lora is not None and m.lora.target_modules:
        known = set(default_lora_targets(hf_config))
        if not known & set(m.lora.target_modules):
            problems.append(f"model.lora.target_modules: none of {m.lora.target_modules} is a projection of this "
                            f"{hf_config.get('model_type')} model; use some of {sorted(known)} (or leave it empty for all)")


def _model_problems(cfg, cap: str, problems: list[str]) -> str:
    """Cross-section rules on model + train; returns the dtype the plan assumes."""
    from rayllm.dtypes import bf16_supported, resolve_dtype

    m, t = cfg.model, cfg.train
    if m.quantization == "4bit":
        import importlib.util

        if not t.use_gpu and os.environ.get(QLORA_ON_CPU_ENV) != "1":
            problems.append("model.quantization: 4bit (QLoRA) is for GPU training (train.use_gpu: true): it exists to fit a "
                            "large base into GPU memory; on CPU set quantization: none and keep the lora section (plain LoRA)")
        if t.zero_stage == 3:
            problems.append("model.quantization: 4bit with train.zero_stage 3: ZeRO-3 would shard the packed 4-bit weights and "
                            "lose their quantization state; the frozen 4-bit base is small, use zero_stage 2 (LoRA states sharded)")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("model.quantization: 4bit needs the bitsandbytes package: pip install bitsandbytes (in rayllm[gpu])")
    if m.dtype == "float16" and not t.use_gpu:
        problems.append("model.dtype: float16 is not supported on CPU; use auto or float32")
    import torch

    # A driver without a GPU cannot see the workers' GPUs: the plan assumes bf16, the workers decide.
    bf16_ok = bf16_supported(t.use_gpu) if not t.use_gpu or torch.cuda.is_available() else True
    if m.dtype == "bfloat16" and not bf16_ok:
        where = "this GPU" if t.use_gpu else f"this CPU ({cap}, no AVX-512 BF16/AMX; bf16 matmuls run ~90× slower)"
        problems.append(f"model.dtype: bfloat16 is not supported at speed on {where}; set dtype: auto or float32")
    if m.attn_implementation == "flash_attention_2" and not t.use_gpu:
        problems.append("model.attn_implementation: flash_attention_2 needs a GPU; use sdpa")
    return m.dtype if m.dtype == "bfloat16" and not bf16_ok else resolve_dtype(m.dtype, t.use_gpu, bf16_ok)


def preflight(cfg, address: str | None = None) -> Preflight:
    """Validate a whole training config against the dataset, the model and the machine; raise ConfigError."""
    from rayllm.model import load_tokenizer, resolve_base

    problems: list[str] = []
    if cfg.train is None:
        raise ConfigError("config", ["train: section missing; `rayllm train` needs train.dataset at least"])
    if cfg.model is None:
        raise ConfigError("config", ["model: section missing; give model.path (fine-tune) or model sizes (new model)"])
    t, m = cfg.train, cfg.model
    cap = cpu_capability()
    dtype = _model_problems(cfg, cap, problems)
    try:
        manifest = read_manifest(t.dataset)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("config", problems + [f"train.dataset: {exc}"]) from None
    splits = manifest.get("splits", {})
    if "train" not in splits or "val" not in splits:
        raise ConfigError("config", problems + [f"train.dataset: manifest lists splits {sorted(splits)}; need train and val"])
    seq_len = manifest["seq_len"]
    tokenizer = load_tokenizer(Path(t.dataset) / manifest.get("tokenizer", "tokenizer"))
    base_dir, max_pos = None, m.max_position_embeddings
    if m.path is not None:
        try:
            base_dir = str(resolve_base(m.path))
        except FileNotFoundError as exc:
            problems.append(f"model.path: {exc}")
        else:
            try:
                base_vocab = load_tokenizer(base_dir).get_vocab()
            except (OSError, ValueError) as exc:
                base_vocab = None
                problems.append(f"model.path: no usable tokenizer in {base_dir} ({exc}); save the tokenizer into the model folder")
            if base_vocab is not None and base_vocab != tokenizer.get_vocab():
                problems.append(f"train.dataset was tokenized with another vocabulary than model.path ({m.path}); "
                                f"re-run `rayllm prepare` with data.tokenizer.path set to the model's folder")
            max_pos = json.loads((Path(base_dir) / "config.json").read_text()).get("max_position_embeddings", seq_len)
    if seq_len > max_pos:
        key = "the base model's max_position_embeddings" if base_dir else "model.max_position_embeddings"
        problems.append(f"the dataset's seq_len ({seq_len}) exceeds {key} ({max_pos}); "
                        + ("prepare with a smaller data.seq_len" if base_dir else "raise model.max_position_embeddings"))
    hf_config = hf_config_of(m, base_dir, tokenizer) if base_dir or m.path is None else None
    if hf_config is not None:
        _arch_problems(cfg, hf_config, manifest, problems)
    problems += dpo.preflight_problems(cfg, manifest, hf_config)
    problems += grpo.preflight_problems(cfg, manifest)
    b = batching(t, seq_len)
    problems += check_batching(b, splits["train"]["sequences"], splits["val"]["sequences"])
    if problems:
        raise ConfigError("config", problems)

    shape = _shape(m, hf_config)
    settings = P.Settings(
        stage=t.zero_stage, workers=t.num_workers, micro_batch=t.micro_batch_size, seq_len=seq_len,
        dtype_bytes=4 if dtype == "float32" else 2, offload_optimizer=t.offload_optimizer != "none",
        offload_param=t.offload_param != "none", gradient_checkpointing=t.gradient_checkpointing, use_gpu=t.use_gpu,
        bucket=bucket_elements(t, shape.trainable_params), accum=t.gradient_accumulation_steps,
        quant_bits=4 if m.quantization == "4bit" else 0, reference_params=dpo.reference_params(cfg, shape.total_params),
    )
    local = address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    capacity = capacity_for(t, local)(t.num_workers)
    return Preflight(manifest, b, dtype, cap, base_dir, shape, settings, P.plan_memory(shape, settings), capacity,
                     eval_micro_batches(b, t.eval_batches, splits["val"]["sequences"]), local)


def gib(x: float | None) -> str:
    """Bytes as GiB for people; None is memory this machine cannot see."""
    return "unknown" if x is None else f"{x / P.GIB:.2f} GiB"


def capacity_text(pre: Preflight) -> str:
    """What the plan is measured against, in words."""
    device, host = pre.capacity
    if not pre.settings.use_gpu:
        return f"of {gib(host)} RAM per worker"
    return f"device {gib(pre.plan.device_total)} of {gib(device)}, host {gib(pre.plan.host_total)} of {gib(host)} per worker"


def describe(pre: Preflight, cfg, with_deepspeed: bool = False) -> str:
    """The plan as a user reads it: shape, batching, bytes per worker, verdict, and what would fit."""
    t, s, sh = cfg.train, pre.settings, pre.shape
    lines = [
        f"model: {sh.total_params:,} params, {sh.trainable_params:,} trainable, largest layer {sh.largest_layer_params:,}; "
        f"dtype {pre.dtype} (CPU capability {pre.cpu_capability})",
        pre.batching.describe(t.max_steps, pre.manifest["splits"]["train"]["sequences"]),
        f"memory per worker: ZeRO-{s.stage}, offload optimizer={t.offload_optimizer} param={t.offload_param}, "
        f"{s.workers} workers, micro-batch {s.micro_batch} × {s.seq_len} tokens"
        + (", gradient checkpointing" if s.gradient_checkpointing else ""),
    ]
    for where, part in (("device", pre.plan.device), ("host", pre.plan.host)):
        for name, value in part.items():
            lines.append(f"  {name:<13}{gib(value):>12}  {where}")
    verdict = "fits" if pre.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<13}{gib(pre.plan.per_worker(s.use_gpu)):>12}  {capacity_text(pre)} → {verdict}")
    if with_deepspeed and s.stage in (2, 3):
        s16 = replace(s, dtype_bytes=2)
        ds = P.deepspeed_model_states(sh, s16)
        dev, host = P.model_states(sh, s16)
        host = f", host {gib(ds[1])} per node (ours {gib(sum(host.values()) * s.workers)})" if s.offload_optimizer else ""
        caveat = " (it assumes every parameter trains: not comparable for LoRA)" if sh.trainable_params < sh.total_params else ""
        lines.append(f"DeepSpeed's estimator at 16-bit weights, model states: device {gib(ds[0])} per worker "
                     f"(ours {gib(sum(dev.values()))}){host}{caveat}")
    if not pre.fits:
        found = P.suggestions(sh, s, capacity_for(t, pre.local))
        lines.append("would fit: " + ("; ".join(found) if found else "nothing nearby — a smaller model, more or larger machines"))
    return "\n".join(lines)
