"""Pure cleaning, hashing and splitting of documents: no Ray, unit-tested.

A raw record becomes either a clean document (text for pretraining, a JSON conversation for
SFT) with its content hash and split, or a reject with a reason. Reasons are a closed set so the
manifest can count them.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from rayllm.chat import validate_messages
from rayllm.config.data import DataConfig

REJECT_REASONS = (
    "invalid_json",  # a jsonl line that does not parse, or is not an object
    "missing_field",  # none of the configured fields is present
    "wrong_type",  # a field of the wrong type (a number where text belongs, ...)
    "bad_messages",  # sft: a conversation that is not a list of {role, content} with an assistant turn
    "empty",  # nothing left after cleaning
    "too_short",  # fewer than min_chars after cleaning
    "too_long",  # more than max_chars after cleaning
    "too_many_tokens",  # sft: a conversation longer than seq_len tokens (it cannot be packed whole); preference: a pair's row
    "identical",  # preference: chosen and rejected are the same response
)

# C0/C1 controls except tab and newline, plus zero-width characters and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, normalize: str = "NFKC") -> str:
    """Unicode-normalise, drop control characters, collapse spaces and blank lines, strip."""
    if normalize != "none":
        text = unicodedata.normalize(normalize, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def content_hash(content: str) -> str:
    """Hash of cleaned content: equal hashes are exact duplicates."""
    return hashlib.blake2b(content.encode("utf-8"), digest_size=16).hexdigest()


def split_of(digest: str, val_fraction: float, salt: str) -> str:
    """'val' or 'train' from the content hash alone: the same on every run and any block layout."""
    if val_fraction <= 0:
        return "train"
    h = hashlib.blake2b((salt + digest).encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "big") / 2**64 < val_fraction else "train"


@dataclass(frozen=True)
class Cleaned:
    content: str = ""  # pretrain: the text; sft: the conversation as canonical JSON
    reject: str = ""  # a REJECT_REASONS entry, or "" when kept
    detail: str = ""  # a short reason for people, written to rejects.jsonl


def _reject(reason: str, detail: str) -> Cleaned:
    return Cleaned(reject=reason, detail=detail)


def _length_problem(n: int, cfg: DataConfig) -> Cleaned | None:
    if n == 0:
        return _reject("empty", "nothing left after cleaning")
    if n < cfg.min_chars:
        return _reject("too_short", f"{n} chars < min_chars {cfg.min_chars}")
    if n > cfg.max_chars:
        return _reject("too_long", f"{n} chars > max_chars {cfg.max_chars}")
    return None


def _bounded(text: str, cfg: DataConfig) -> Cleaned:
    return _length_problem(len(text), cfg) or Cleaned(content=text)


def clean_pretrain(record: Any, cfg: DataConfig) -> Cleaned:
    """A record (dict from jsonl/parquet, or str from a text file) → one cleaned document."""
    if isinstance(record, str):
        return _bounded(clean_text(record, cfg.normalize), cfg)
    if not isinstance(record, dict):
        return _reject("invalid_json", f"expected a JSON object, got {type(record).__name__}")
    present = [f for f in cfg.text_fields if f in record and record[f] is not None]
    if not present:
        return _reject("missing_field", f"none of the fields {cfg.text_fields} present")
    bad = [f for f in present if not isinstance(record[f], str)]
    if bad:
        return _reject("wrong_type", f"field {bad[0]!r} is {type(record[bad[0]]).__name__}, expected string")
    text = "\n\n".join(clean_text(record[f], cfg.normalize) for f in present)
    return _bounded(text.strip(), cfg)


def clean_sft(record: Any, cfg: DataConfig) -> Cleaned:
    """A record with a `messages` list or prompt/response pair → one cleaned conversation."""
    if not isinstance(record, dict):
        return _reject("invalid_json", f"expected a JSON object, got {type(record).__name__}")
    if cfg.messages_field in record:
        messages = record[cfg.messages_field]
        if isinstance(messages, str):  # parquet/arrow often carry nested data as a JSON string
            try:
                messages = json.loads(messages)
            except ValueError:
                return _reject("wrong_type", f"field {cfg.messages_field!r} is a string that is not JSON")
    elif cfg.prompt_field in record and cfg.response_field in record:
        prompt, response = record[cfg.prompt_field], record[cfg.response_field]
        if not isinstance(prompt, str) or not isinstance(response, str):
            return _reject("wrong_type", f"{cfg.prompt_field!r} and {cfg.response_field!r} must be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    else:
        return _reject("missing_field", f"neither {cfg.messages_field!r} nor {cfg.prompt_field!r}+{cfg.response_field!r} present")
    problem = validate_messages(messages)
    if problem:
        return _reject("bad_messages", problem)
    cleaned = [{"role": m["role"], "content": clean_text(m["content"], cfg.normalize)} for m in messages]
    if not any(m["role"] == "assistant" and m["content"] for m in cleaned):
        return _reject("bad_messages", "no non-empty assistant message")
    if any(not m["content"] for m in cleaned if m["role"] != "system"):
        return _reject("empty", "a user or assistant message is empty after cleaning")
    problem_len = _length_problem(sum(len(m["content"]) for m in cleaned), cfg)
    if problem_len:
        return problem_len
    return Cleaned(content=json.dumps(cleaned, ensure_ascii=False, sort_keys=True))


def parse_json_line(line: str) -> tuple[Any, str]:
    """A jsonl line → (record, "") or (None, detail) when it is not valid JSON."""
    try:
        return json.loads(line), ""
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"


def split_paragraphs(text: str) -> list[str]:
    """Plain text → paragraphs at blank lines (the `paragraph` text_unit)."""
    parts = re.split(r"\n(?:[^\S\n]*\n)+", text.replace("\r\n", "\n"))
    return [p.strip() for p in parts if p.strip()]
