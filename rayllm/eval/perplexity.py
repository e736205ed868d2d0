"""Perplexity of a model (optionally with a LoRA adapter) over a prepared dataset's split, counted
exactly as the trainer counts it: the same packed rows (`PackedSplit`), the same targets (labels
shifted inside `micro_loss`, -100 ignored, targets across a document start dropped with
`document_masking`) and the same summed fp32 cross-entropy, divided by the same token count.
With the weights a run exported and `max_sequences` = the rows its evaluation covered
(eval_batches × micro_batch_size × num_workers), the figure is the run's `val_ppl`.

This is the figure the promotion gate compares a live endpoint against:

    from rayllm.eval.perplexity import perplexity
    perplexity("runs/train/base/model", "runs/data/sft", adapter="runs/train/lora/adapter").ppl
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Perplexity:
    loss: float  # mean next-token cross-entropy per target token (nats)
    ppl: float  # exp(loss), capped as the trainer caps it
    tokens: int  # target tokens counted
    sequences: int  # packed rows scored

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(model_dir: str | Path, dataset: str | Path, *, split: str = "val", adapter: str | Path | None = None,
               max_sequences: int | None = None, batch_size: int = 8, document_masking: bool = True,
               dtype: str = "float32") -> Perplexity:
    """Token-weighted mean loss and perplexity of `model_dir` (+ `adapter`) over the first
    `max_sequences` rows (all when None) of `split` of the prepared `dataset`."""
    import torch

    from rayllm.dtypes import resolve_dtype
    from rayllm.train.data import PackedSplit
    from rayllm.train.loop import micro_loss

    model = load_for_scoring(model_dir, adapter, resolve_dtype(dtype, use_gpu=False, key="eval.dtype"))
    packed = PackedSplit.read(dataset, split)
    rows = scoring_split(packed, model.config)
    n = len(rows) if max_sequences is None else min(max_sequences, len(rows))
    vocab = model.get_input_embeddings().num_embeddings
    if n and int(packed.input_ids[:n].max()) >= vocab:
        raise ValueError(f"{dataset} {split}: token ids reach {int(packed.input_ids[:n].max())} but {model_dir} has "
                         f"{vocab} embeddings: the dataset was tokenized for another model")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            total += micro_loss(model, rows.batch(idx, document_masking), torch.device("cpu")).item()
            count += rows.target_tokens(idx, document_masking)
    loss = total / max(count, 1)
    return Perplexity(loss, math.exp(min(loss, 50.0)), count, n)  # the cap the trainer's evaluate applies


def load_for_scoring(model_dir: str | Path, adapter: str | Path | None, dtype: str):
    """The model in eval mode as the trainer built it (rayllm.model.load_model), the adapter applied by PEFT."""
    from rayllm.model import load_model

    model = load_model(str(model_dir), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def scoring_split(rows, hf_config):
    """The rows as the model consumes them: packed rows, or encoder-decoder examples (as train.data.read_splits)."""
    if getattr(hf_config, "is_encoder_decoder", False):
        from rayllm.train.seq2seq import Seq2SeqSplit

        return Seq2SeqSplit(rows, hf_config.pad_token_id, hf_config.decoder_start_token_id)
    return rows
