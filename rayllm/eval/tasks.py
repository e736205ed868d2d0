"""Generation tasks: rows read from jsonl (bad rows counted, never fatal, as `prepare` does), prompts
rendered through the one chat rendering (rayllm.chat), and the scores from the libraries people
trust: sacrebleu for BLEU, rouge-score for ROUGE-L, and the SQuAD v2 evaluation script's
normalisation, exact match and token F1 as transformers ships it (`squad_metrics`; the `evaluate`
package's squad metric loads its script from the Hub, which this product never calls)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayllm.chat import validate_messages


@dataclass(frozen=True)
class Row:
    index: int  # line number (1-based) in the task file
    prompt: str | None
    messages: list[dict] | None
    references: list[str]


@dataclass
class TaskRows:
    rows: list[Row]
    bad: Counter = field(default_factory=Counter)  # reason -> rows
    samples: list[dict] = field(default_factory=list)  # first few bad rows: line, reason

    def summary(self, path: str) -> str:
        if not self.bad:
            return f"{path}: {len(self.rows)} rows"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items()))
        first = self.samples[0]
        return (f"{path}: {len(self.rows)} rows, {sum(self.bad.values())} bad rows skipped ({reasons}; "
                f"first at line {first['line']}: {first['reason']})")


def _row(obj: Any, line: int) -> tuple[Row | None, str | None]:
    """(row, None) or (None, why the line is not a usable row)."""
    if not isinstance(obj, dict):
        return None, "wrong_type: a row is a JSON object"
    refs = obj.get("references", obj.get("reference"))
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        return None, "missing_field: reference (text) or references (list of texts) required"
    if "messages" in obj:
        why = validate_messages(obj["messages"])
        if why:
            return None, f"bad_messages: {why}"
        return Row(line, None, obj["messages"], refs), None
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        return None, "missing_field: prompt (text) or messages required"
    return Row(line, obj["prompt"], None, refs), None


def read_rows(path: str | Path, max_rows: int | None = None) -> TaskRows:
    """Valid rows of a task file, and the bad ones counted by reason."""
    out = TaskRows([])
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row, why = _row(json.loads(line), line_no)
            except json.JSONDecodeError:
                row, why = None, "invalid_json: not valid JSON"
            if row is None:
                out.bad[why.split(":")[0]] += 1
                if len(out.samples) < 5:
                    out.samples.append({"line": line_no, "reason": why})
            elif max_rows is None or len(out.rows) < max_rows:
                out.rows.append(row)
    return out


def messages_of(row: Row, chat: bool) -> list[dict] | None:
    """The conversation a row asks for, or None for a raw completion prompt (chat: false)."""
    if row.messages is not None:
        return row.messages
    return [{"role": "user", "content": row.prompt}] if chat else None


def prompt_ids(tokenizer, row: Row, chat: bool) -> list[int]:
    """Token ids of the prompt: the chat template through rayllm.chat (the ids SFT trained on and
    serving renders), or the raw prompt text."""
    from rayllm.chat import render_chat

    messages = messages_of(row, chat)
    if messages is None:
        return list(tokenizer(row.prompt, add_special_tokens=False)["input_ids"])
    return render_chat(tokenizer, messages, add_generation_prompt=True).input_ids


# -- metrics (all ×100, as sacrebleu reports BLEU) ---------------------------------------------------

def bleu(outputs: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU; rows with fewer references are padded with None, as sacrebleu allows."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(outputs, streams).score)


def rouge_l(outputs: list[str], references: list[list[str]]) -> float:
    """Mean rouge-score ROUGE-L F-measure (stemmed), best reference per row."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * sum(scorer.score_multi(refs, out)["rougeL"].fmeasure for out, refs in zip(outputs, references)) / max(len(outputs), 1)


def exact_match(outputs: list[str], references: list[list[str]]) -> float:
    from transformers.data.metrics.squad_metrics import compute_exact

    return 100.0 * sum(max(compute_exact(r, out) for r in refs) for out, refs in zip(outputs, references)) / max(len(outputs), 1)


def token_f1(outputs: list[str], references: list[list[str]]) -> float:
    from transformers.data.metrics.squad_metrics import compute_f1

    return 100.0 * sum(max(compute_f1(r, out) for r in refs) for out, refs in zip(outputs, references)) / max(len(outputs), 1)


METRIC_FUNCTIONS = {"bleu": bleu, "rougeL": rouge_l, "exact_match": exact_match, "f1": token_f1}


def score(metrics: list[str], outputs: list[str], references: list[list[str]]) -> dict[str, float]:
    return {m: METRIC_FUNCTIONS[m](outputs, references) for m in metrics}
