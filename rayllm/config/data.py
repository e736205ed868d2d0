"""`data:` — what `rayllm prepare` reads, how it cleans, splits, tokenizes and packs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayllm.config.base import Section


class TokenizerConfig(Section):
    path: str | None = Field(None, description="Existing local HF tokenizer folder to use instead of training one.")
    vocab_size: int = Field(8192, ge=256, le=1_000_000, description="Vocabulary size of the byte-level BPE trained on the train split.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_docs: int = Field(200_000, ge=1, description="At most this many train documents (a deterministic hash sample) train the tokenizer.")
    bos_token: str = Field("<|bos|>", description="Beginning-of-sequence special token.")
    eos_token: str = Field("<|eos|>", description="End-of-sequence special token, placed between packed documents.")
    pad_token: str = Field("<|pad|>", description="Padding special token (never trained on: its label is -100).")
    extra_special_tokens: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"],
        description="More special tokens; the default chat template uses <|im_start|> and <|im_end|>.",
    )
    chat_template: str | None = Field(None, description="Jinja chat template; default: ChatML with assistant generation markers.")


class DataConfig(Section):
    inputs: list[str] = Field(..., min_length=1, description="Files, directories or globs, local or any fsspec/pyarrow URI (s3://, gs://, ...); `botchan`: the public-domain novel setup installs.")
    format: Literal["auto", "jsonl", "parquet", "text"] = Field("auto", description="Input format; auto picks by extension (.jsonl/.json[.gz|.zst], .parquet, else text).")
    mode: Literal["pretrain", "sft", "preference"] = Field("pretrain", description="pretrain: plain text, every token trained; sft: conversations, only assistant tokens trained; preference: prompt + chosen + rejected pairs for `train.objective: dpo` (one pair per row, labels on the two responses only).")
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1, description="pretrain: fields joined (blank line between) into one document.")
    messages_field: str = Field("messages", description="sft: field holding a list of {role, content} messages.")
    prompt_field: str = Field("prompt", description="sft: prompt field of prompt/response pairs (used when messages_field is absent); preference: the prompt (a string or a message list; absent: the messages the two conversations share before their last assistant turn).")
    response_field: str = Field("response", description="sft: response field of prompt/response pairs.")
    system_prompt: str | None = Field(None, description="sft, preference: system message prepended to a prompt given as a string.")
    chosen_field: str = Field("chosen", description="preference: field holding the preferred response (a string, a message list, or a whole conversation).")
    rejected_field: str = Field("rejected", description="preference: field holding the dispreferred response, in the same shape as chosen_field.")
    text_unit: Literal["file", "paragraph", "line"] = Field("paragraph", description="Plain-text files: what one document is (paragraphs split at blank lines).")
    output_dir: str = Field(..., description="Where the prepared dataset (parquet shards, tokenizer, manifest.json) is written.")
    normalize: Literal["NFC", "NFKC", "none"] = Field("NFKC", description="Unicode normalisation form applied before anything else.")
    min_chars: int = Field(1, ge=1, description="Documents shorter than this after cleaning are rejected (reason too_short).")
    max_chars: int = Field(1_000_000, ge=1, description="Documents longer than this after cleaning are rejected (reason too_long).")
    dedup: bool = Field(True, description="Exact deduplication of cleaned documents across the whole dataset.")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of documents in the validation split, chosen by content hash.")
    split_salt: str = Field("rayllm", description="Salt of the split hash; change it to draw another deterministic split.")
    seq_len: int = Field(512, ge=8, le=1_048_576, description="Length of every packed training sequence, in tokens; preference: of a pair's row, which holds prompt + chosen and prompt + rejected (about 2 × TRL's max_length).")
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0, description="The run fails when more than this fraction of input rows is rejected.")
    rejects_sample: int = Field(50, ge=0, description="At most this many rejected rows per reason are written to rejects.jsonl.")
    batch_size: int = Field(2048, ge=1, description="Documents per Ray Data batch in the tokenize/pack stage.")
    num_actors: int = Field(2, ge=1, description="Tokenizer actors in the Ray Data actor pool.")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs each tokenizer actor holds.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer: train a byte-level BPE, or use an existing one.")

    @model_validator(mode="after")
    def _bounds(self) -> "DataConfig":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self
