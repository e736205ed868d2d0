"""Validation perplexity of a model behind an OpenAI-compatible endpoint, counted as the trainer counts it.

Each request is what lm-eval's `local-completions` sends for a loglikelihood: POST /v1/completions
with the prompt as token ids, `echo: true`, `logprobs`, `max_tokens: 0` and `temperature: 0`; the
answer's `token_logprobs` give log p(token | everything before it in the prompt). Token ids, not
text, so the endpoint's tokenizer and chat template cannot change what is scored.

The sequences are the first N of a prepared dataset's val split and the targets are exactly the
trainer's (`PackedSplit.target_tokens`, `loop.evaluate`): labels other than -100, after the shift.
With document masking the trainer restarts positions and masks attention at each document start;
the same computation on an endpoint is one prompt per document segment, which is what is sent.
Segments without a target (padding, prompts of an SFT row) are not sent at all.

lm-eval itself is not called here: its loglikelihood API scores (context, continuation) pairs
and would re-tokenize text; the trainer's figure needs its exact token ids and masks.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IGNORE = -100  # the trainer's ignore index (rayllm.train.data.IGNORE), repeated to keep this import light


class EndpointError(RuntimeError):
    """The endpoint could not be measured; the message is one line naming the endpoint and the reason.
    `status` is the HTTP status of a refusal, None when no answer came (unreachable, timeout)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Segment:
    """One prompt: token ids and the indices (within them) whose log-probability the trainer counts."""

    row: int
    ids: list[int]
    targets: list[int]


def segments(input_ids: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray, document_masking: bool = True) -> list[Segment]:
    """The prompts that reproduce the trainer's loss on these [rows, seq_len] arrays, in row order.

    A target is a position t >= 1 with labels[t] != -100 that is not a document start (with
    masking); the model's prediction of it comes from logits[t - 1], i.e. the prompt logprob at t.
    """
    out = []
    for r in range(input_ids.shape[0]):
        ids, lab, docs = input_ids[r], labels[r], doc_ids[r]
        keep = lab != IGNORE
        if np.any(keep & (lab != ids)):
            raise ValueError(f"val row {r}: a label differs from its input token; the served figure can only score "
                             "the prompt's own tokens (causal-LM datasets label the input, or -100)")
        if document_masking:
            cuts = [0, *(np.flatnonzero(docs[1:] != docs[:-1]) + 1).tolist(), len(ids)]
        else:
            cuts = [0, len(ids)]
        for s, e in zip(cuts[:-1], cuts[1:]):
            targets = [t - s for t in range(s + 1, e) if keep[t]]
            if targets:
                out.append(Segment(r, ids[s:e].astype(int).tolist(), targets))
    return out


def load_val(dataset: str | Path, sequences: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `sequences` val rows (all when None) of a prepared dataset, as the trainer reads them."""
    from rayllm.train.data import PackedSplit

    val = PackedSplit.read(dataset, "val")
    n = len(val) if sequences is None else min(sequences, len(val))
    return val.input_ids[:n], val.labels[:n], val.doc_ids[:n]


def _post(client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    try:
        response = client.post(url, json=body)
    except httpx.TimeoutException as e:
        raise EndpointError(f"{url}: no answer within the timeout ({type(e).__name__})") from None
    except httpx.HTTPError as e:
        raise EndpointError(f"{url}: cannot reach the endpoint ({type(e).__name__}: {e})") from None
    if response.status_code == 401:
        raise EndpointError(f"{url}: the endpoint refused the API key (401); set the key's environment variable", 401)
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise EndpointError(f"{url}: HTTP {response.status_code}: {message}", response.status_code)
    return response.json()


def score_segment(client, url: str, model: str, seg: Segment) -> tuple[float, int]:
    """(summed negative log-likelihood of the segment's targets, their count) from one request."""
    body = {"model": model, "prompt": seg.ids, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0}
    answer = _post(client, url, body)
    if answer.get("model") != model:  # `name@vN` must be answered by exactly that version
        raise EndpointError(f"{url}: asked for model {model!r}, answered by {answer.get('model')!r}", 200)
    logprobs = (answer["choices"][0].get("logprobs") or {}).get("token_logprobs") or []
    if len(logprobs) < len(seg.ids):
        raise EndpointError(f"{url}: echo returned {len(logprobs)} prompt logprobs for a {len(seg.ids)}-token prompt; "
                            "the endpoint does not support echo with logprobs", 200)
    values = [logprobs[t] for t in seg.targets]
    if any(v is None or not math.isfinite(v) for v in values):
        raise EndpointError(f"{url}: a prompt logprob came back empty or not finite", 200)
    return -float(sum(values)), len(values)


def served_perplexity(url: str, model: str, dataset: str | Path, *, sequences: int | None = None,
                      document_masking: bool = True, api_key: str | None = None, timeout_s: float = 30.0,
                      concurrency: int = 4) -> dict[str, Any]:
    """{loss, ppl, tokens, sequences} of `model` served at `url` (the server root, or ending in /v1) over the
    first `sequences` val rows of `dataset`. Every request has `timeout_s`; the first failure ends the run."""
    import httpx

    arrays = load_val(dataset, sequences)
    segs = segments(*arrays, document_masking=document_masking)
    if not segs:
        raise ValueError(f"{dataset}: the val split has no target tokens in its first {sequences or 'all'} sequences")
    root = url.rstrip("/")
    endpoint = f"{root}/completions" if root.endswith("/v1") else f"{root}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    with httpx.Client(timeout=timeout, headers=headers) as client:
        first = score_segment(client, endpoint, model, segs[0])  # fails fast (refused key, wrong model) before fanning out
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
        try:
            rest = list(pool.map(lambda s: score_segment(client, endpoint, model, s), segs[1:]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, requests not yet sent are dropped
    nll = first[0] + sum(r[0] for r in rest)
    tokens = first[1] + sum(r[1] for r in rest)
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens, "sequences": int(arrays[0].shape[0])}


def api_key_from_env(var: str | None) -> str | None:
    """The key in environment variable `var` (None when unset or empty)."""
    return (os.environ.get(var) or None) if var else None
