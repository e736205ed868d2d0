"""Train a byte-level BPE on the train split, or load an existing HF tokenizer folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from rayllm.chat import DEFAULT_CHAT_TEMPLATE
from rayllm.config.data import TokenizerConfig


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path) -> Any:
    """Train a byte-level BPE with HF `tokenizers`; saved as a `PreTrainedTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [cfg.pad_token, cfg.bos_token, cfg.eos_token, *cfg.extra_special_tokens]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(dict.fromkeys(specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        additional_special_tokens=[t for t in cfg.extra_special_tokens],
    )
    hf.chat_template = cfg.chat_template or DEFAULT_CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(path: str | Path) -> Any:
    from rayllm.model import load_tokenizer as load

    return checked(load(path), path)


def checked(tok: Any, path: str | Path) -> Any:
    """`tok` with a pad token, or an error when it has no eos token (the one loaded from `path`)."""
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token; packing needs one between documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of the loss, so any id will do
    return tok
