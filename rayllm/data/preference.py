"""Preference rows (`data.mode: preference`) → one training row per pair, for `train.objective: dpo`.

Three shapes are read as they ship:
  * strings: `prompt` + `chosen` + `rejected` (the prompt becomes a user turn, behind `system_prompt`);
  * message lists (UltraFeedback-style): `prompt` a string or messages, `chosen` / `rejected` lists that
    hold either the response alone or the whole conversation (the prompt's messages are then its prefix);
  * whole conversations and no prompt (Anthropic HH-style): `chosen` / `rejected` share every message
    but the last assistant turn, as message lists or as HH's "\\n\\nHuman: … \\n\\nAssistant: …" text.

A cleaned pair is canonical JSON {"prompt", "chosen", "rejected"} (message lists), hashed and split as
one document, so a pair's two sides never land in different splits or shards. `PreferenceRender` turns
it into the two token sequences through the one chat rendering (rayllm.chat), labels on the response's
assistant tokens only; `pair_rows` lays each pair into one row: prompt + chosen as document 0,
prompt + rejected as document 1, padding after. The trainer splits the row back (train/dpo.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from rayllm.chat import validate_messages
from rayllm.data.clean import Cleaned, _length_problem, _reject, clean_text
from rayllm.data.pack import IGNORE_INDEX, Packed, to_arrow

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text: str) -> list[dict] | None:
    """Anthropic HH text ("\\n\\nHuman: … \\n\\nAssistant: …") → messages; None when it is not in that form."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _as_messages(value: Any, field: str) -> tuple[list[dict] | None, str, str]:
    """A response, conversation or prompt field → (messages, "", "") or (None, reason, detail). A plain
    string is one assistant turn unless it is HH text or a JSON list of messages (parquet often carries
    nested data as such strings)."""
    if isinstance(value, str):
        stripped = value.strip()
        if not (stripped.startswith("[") and stripped.endswith("]") and '"role"' in stripped):
            return parse_hh(value) or [{"role": "assistant", "content": value}], "", ""
        try:
            value = json.loads(stripped)
        except ValueError:
            return None, "wrong_type", f"field {field!r} is a string that looks like JSON but does not parse"
    if not isinstance(value, list):
        return None, "wrong_type", f"field {field!r} is {type(value).__name__}; expected a string or a list of messages"
    problem = validate_messages(value)
    if problem:
        return None, "bad_messages", f"{field}: {problem}"
    return [{"role": m["role"], "content": m["content"]} for m in value], "", ""


def _split_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]] | None:
    """Two whole conversations → (shared prompt, chosen response, rejected response): the prompt is
    everything before the last assistant turn, and it must be the same in both."""
    def last_assistant(msgs: list[dict]) -> int:
        return max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)

    ci, ri = last_assistant(chosen), last_assistant(rejected)
    if ci < 1 or ri < 1 or chosen[:ci] != rejected[:ri]:
        return None
    return chosen[:ci], chosen[ci:], rejected[ri:]


def _clean_messages(msgs: list[dict], normalize: str) -> list[dict]:
    return [{"role": m["role"], "content": clean_text(m["content"], normalize)} for m in msgs]


def _strip_prompt(side: list[dict], prompt: list[dict]) -> list[dict]:
    """UltraFeedback ships chosen/rejected as whole conversations beside the prompt: keep what follows it
    (the prompt's messages, or its non-system ones when the system message came from system_prompt)."""
    for head in (prompt, [m for m in prompt if m["role"] != "system"]):
        if head and len(side) > len(head) and side[:len(head)] == head:
            return side[len(head):]
    return side


def clean_preference(record: Any, cfg) -> Cleaned:
    """One preference record (any of the three shapes) → a cleaned pair, or a reject with its reason."""
    if not isinstance(record, dict):
        return _reject("invalid_json", f"expected a JSON object, got {type(record).__name__}")
    missing = [f for f in (cfg.chosen_field, cfg.rejected_field) if record.get(f) is None]
    if missing:
        return _reject("missing_field", f"field {missing[0]!r} is missing")
    sides = []
    for field in (cfg.chosen_field, cfg.rejected_field):
        msgs, reason, detail = _as_messages(record[field], field)
        if msgs is None:
            return _reject(reason, detail)
        sides.append(msgs)
    chosen, rejected = sides
    prompt_value = record.get(cfg.prompt_field)
    if prompt_value is None:
        split = _split_prompt(chosen, rejected)
        if split is None:
            return _reject("bad_messages", f"no {cfg.prompt_field!r} field, and {cfg.chosen_field!r} / {cfg.rejected_field!r} are not "
                                           "conversations that share every turn before their last assistant turn")
        prompt, chosen, rejected = split
    elif isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
        if cfg.system_prompt:
            prompt.insert(0, {"role": "system", "content": cfg.system_prompt})
    else:
        prompt, reason, detail = _as_messages(prompt_value, cfg.prompt_field)
        if prompt is None:
            return _reject(reason, detail)
    chosen, rejected = _strip_prompt(chosen, prompt), _strip_prompt(rejected, prompt)
    prompt, chosen, rejected = (_clean_messages(m, cfg.normalize) for m in (prompt, chosen, rejected))
    if not any(m["content"] for m in prompt if m["role"] != "system"):
        return _reject("missing_field", "the prompt is empty")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant" or not side[-1]["content"]:
            return _reject("bad_messages", f"the {name} response does not end with a non-empty assistant turn")
    if chosen == rejected:
        return _reject("identical", "chosen and rejected are the same after cleaning")
    problem = _length_problem(sum(len(m["content"]) for m in prompt + chosen + rejected), cfg)
    if problem:
        return problem
    return Cleaned(content=json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False, sort_keys=True))


def pair_text(content: str) -> str:
    """Every message of a cleaned pair, for training a tokenizer on preference data."""
    pair = json.loads(content)
    return "\n".join(m["content"] for side in ("prompt", "chosen", "rejected") for m in pair[side])


def render_pair(tokenizer, pair: dict) -> tuple[list[int], list[int], list[int], list[int]]:
    """(chosen ids, chosen labels, rejected ids, rejected labels): prompt + response through the one
    chat rendering; labels are the response's assistant tokens (its end token included), -100 elsewhere,
    so assistant turns inside a multi-turn prompt are not trained."""
    from rayllm.chat import render_chat

    start = len(render_chat(tokenizer, pair["prompt"], add_generation_prompt=True).input_ids)
    out = []
    for side in ("chosen", "rejected"):
        r = render_chat(tokenizer, pair["prompt"] + pair[side])
        out += [r.input_ids, [t if m and i >= start else IGNORE_INDEX for i, (t, m) in enumerate(zip(r.input_ids, r.assistant_mask))]]
    return tuple(out)


class PreferenceRender:
    """Ray Data stage: cleaned pairs → the row each pair becomes (ids, labels, doc ids) and its length `n`."""

    def __init__(self, tokenizer_dir: str):
        from rayllm.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, labels, docs = [], [], []
        for content in batch["content"]:
            c_ids, c_lab, r_ids, r_lab = render_pair(self.tok, json.loads(content))
            ids.append(np.asarray(c_ids + r_ids, dtype=np.int32))
            labels.append(np.asarray(c_lab + r_lab, dtype=np.int32))
            docs.append(np.repeat(np.array([0, 1], dtype=np.int32), [len(c_ids), len(r_ids)]))

        def column(arrays):
            return np.array(arrays + [None], dtype=object)[:-1]

        out = {"ids": column(ids), "labels": column(labels), "docs": column(docs),
               "n": np.array([len(x) for x in ids], dtype=np.int64), "content": batch["content"]}
        if "split" in batch:
            out["split"] = batch["split"]
        return out


def pair_rows(batch: dict[str, np.ndarray], seq_len: int, pad_id: int):
    """Rendered pairs (each at most seq_len tokens) → one padded row per pair, the prepared-dataset layout."""
    rows = len(batch["ids"])
    ids = np.full((rows, seq_len), pad_id, dtype=np.int32)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int32)
    docs = np.full((rows, seq_len), -1, dtype=np.int32)
    for i, (a, b, d) in enumerate(zip(batch["ids"], batch["labels"], batch["docs"])):
        ids[i, :len(a)], labels[i, :len(b)], docs[i, :len(d)] = a, b, d
    n_tokens = (docs >= 0).sum(axis=1).astype(np.int32)
    return to_arrow(Packed(ids, labels, docs, n_tokens, np.full(rows, 2, dtype=np.int32)))
