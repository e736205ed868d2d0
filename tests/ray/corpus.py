"""Generated corpora with planted bad rows and duplicates, whose expected counts are known."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "the a river stone light window quiet bright fox jumps over lazy dog under silver moon and old house".split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_pretrain_corpus(root: Path) -> dict:
    """jsonl + jsonl.zst + parquet + txt, with known rejects and cross-file duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    unique = [f"Document {i}. " + " ".join(sentence(rng) for _ in range(3)) for i in range(300)]
    lines = [json.dumps({"text": t}) for t in unique[:200]]
    lines += [json.dumps({"text": unique[i] + "   "}) for i in range(10)]  # 10 duplicates after cleaning
    lines += ["{not json", "[1, 2"]  # 2 invalid_json
    lines += [json.dumps({"body": "no text field"})] * 3  # 3 missing_field
    lines += [json.dumps({"text": 42})] * 2  # 2 wrong_type
    lines += [json.dumps({"text": " \u200b\x00 "})]  # 1 empty
    lines += [json.dumps({"text": "x" * 5000})]  # 1 too_long (max_chars 4000)
    rng.shuffle(lines)
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    zst = [json.dumps({"text": t}) for t in unique[200:250]] + [json.dumps({"text": unique[0]})] * 2  # 2 more duplicates
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(zst) + "\n").encode()))
    pq.write_table(pa.table({"text": unique[250:290] + [unique[5]]}), root / "c.parquet")  # 1 more duplicate
    (root / "d.txt").write_text("\n\n".join(unique[290:300]) + "\n\n" + unique[1] + "\n")  # 10 paragraphs + 1 duplicate
    return {
        "rows_in": 219 + 52 + 41 + 11,
        "rejects": {"invalid_json": 2, "missing_field": 3, "wrong_type": 2, "empty": 1, "too_long": 1},
        "duplicates_removed": 10 + 2 + 1 + 1,
        "documents": 300,
    }


def write_sft_corpus(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    rows = []
    for i in range(60):
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": f"Question {i}: {sentence(rng, 6)}"},
                                      {"role": "assistant", "content": f"Answer {i}: {sentence(rng, 8)}"},
                                      {"role": "user", "content": "And then?"},
                                      {"role": "assistant", "content": sentence(rng, 5)}]})
        else:
            rows.append({"prompt": f"Prompt {i}: {sentence(rng, 6)}", "response": f"Response {i}: {sentence(rng, 6)}"})
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})  # bad_messages
    rows.append({"prompt": "long " * 400, "response": "ok"})  # too_many_tokens at seq_len 256
    lines = [json.dumps(r) for r in rows] + ["{oops"]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return {"rows_in": 63, "rejects": {"bad_messages": 1, "too_many_tokens": 1, "invalid_json": 1}, "documents": 60}
