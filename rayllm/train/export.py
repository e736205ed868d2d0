"""What a run hands on: a plain HF model folder (full training, or a ZeRO checkpoint merged offline),
or a PEFT adapter folder with `rayllm_adapter.json` (LoRA), or a LoRA merged into its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ADAPTER_META = "rayllm_adapter.json"


def _replace_dir(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place, so readers never see a half-written one."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def gather_state_dict(engine, lora: bool) -> dict | None:
    """The full (or LoRA-only) state dict on rank 0, None elsewhere (collective under ZeRO-3)."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_model(engine, tokenizer, out_dir: Path) -> Path | None:
    """Full weights → `out_dir` as an HF folder (config, safetensors, tokenizer with chat template)."""
    state = gather_state_dict(engine, lora=False)
    if state is None:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    engine.module.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    return _replace_dir(tmp, out_dir)


def save_adapter(engine, out_dir: Path, meta: dict) -> Path | None:
    """LoRA weights → `out_dir` as a PEFT folder (safetensors) plus rayllm_adapter.json (`meta`)."""
    state = gather_state_dict(engine, lora=True)
    if state is None:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return _replace_dir(tmp, out_dir)


def adapter_meta(*, base_fingerprint: str, lora_cfg, target_modules: list[str], config_hash: str, metrics: dict, source_run: str,
                 base_model: str | None) -> dict:
    """The metadata the registry and the server read next to a PEFT folder."""
    return {
        "base_fingerprint": base_fingerprint,
        "base_model": base_model,
        "rank": lora_cfg.rank,
        "alpha": lora_cfg.alpha,
        "target_modules": list(target_modules),
        "config_hash": config_hash,
        "metrics": metrics,
        "source_run": source_run,
    }


def checkpoint_to_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """A full-weight training checkpoint (any ZeRO stage) → HF folder, with fp32 master weights.

    ZeRO-3 keeps each rank's parameter shard in its own file; DeepSpeed's zero_to_fp32 merges them.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from rayllm.model import _auto_class
    from rayllm.train.checkpoint import TAG

    ckpt, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(ckpt / "hf")
    model = _auto_class(config).from_config(config, dtype=torch.float32)
    if list((ckpt / TAG).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    else:  # ZeRO stage 0: the model states file holds the whole module
        state = torch.load(ckpt / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head, T5's per-stack embeddings) are one tensor saved under its first name
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{ckpt} is not a full-weight checkpoint of this config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    return _replace_dir(tmp, out_dir)


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base folder + PEFT adapter → one HF folder with the adapter folded into the weights."""
    from peft import PeftModel

    from rayllm.model import load_model, load_tokenizer

    out_dir = Path(out_dir)
    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(base_dir).save_pretrained(tmp)
    return _replace_dir(tmp, out_dir)
