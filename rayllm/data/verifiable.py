"""A verifiable preference task: small sums answered in a required format, generated and checked by code.

The rule: "What is A + B?" is answered `= N`, N the correct sum, nothing else. Each pair's chosen
answer follows the rule; the rejected one breaks it in one of three ways — the right number without
the format, the format around a wrong number, or a sentence. `follows_rule` is the program that
checks an answer, so a model's answers on held-out prompts can be counted (greedy, before and after
DPO). Deterministic for a seed; prompts are drawn without repeats, so train and val pairs differ.

The same task for online RL (GRPO): `problems` writes each prompt with its reference answer as an
sft conversation (system, question, answer '= N'), so `rayllm prepare` with data.mode sft turns it
into prompts and answers, and the exact_match reward (or `follows_rule`) scores completions.

    python -m rayllm.data.verifiable OUT.jsonl --pairs 2000 --seed 0
    python -m rayllm.data.verifiable OUT.jsonl --pairs 2000 --seed 0 --problems
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SYSTEM = "Answer a sum as '= N' and nothing else."
_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
_ANSWER = re.compile(r"^= (-?\d+)$")


def prompt_of(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def follows_rule(prompt: str, answer: str) -> bool:
    """Whether `answer` is exactly '= N' with N the sum the prompt asks for."""
    q, m = _QUESTION.search(prompt), _ANSWER.match(answer.strip())
    return bool(q and m) and int(m.group(1)) == int(q.group(1)) + int(q.group(2))


def _rejected(a: int, b: int, rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return str(a + b)
    if kind == 1:
        return f"= {a + b + rng.choice([-2, -1, 1, 2])}"
    return f"The sum of {a} and {b} is {a + b}."


def operands(n: int, seed: int, high: int = 30) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs with 0 ≤ a, b < high, in a seeded order."""
    every = [(a, b) for a in range(high) for b in range(high)]
    if n > len(every):
        raise ValueError(f"at most {len(every)} distinct prompts with operands below {high}; ask for fewer pairs")
    return random.Random(seed).sample(every, n)


def pairs(n: int, seed: int = 0, high: int = 30) -> list[dict]:
    """n preference records {system, prompt, chosen, rejected}: chosen follows the rule, rejected does not."""
    rng = random.Random(seed + 1)
    out = []
    for a, b in operands(n, seed, high):
        chosen, rejected = f"= {a + b}", _rejected(a, b, rng)
        assert follows_rule(prompt_of(a, b), chosen) and not follows_rule(prompt_of(a, b), rejected)
        out.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt_of(a, b)}],
                    "chosen": chosen, "rejected": rejected})
    return out


def problems(n: int, seed: int = 0, high: int = 30) -> list[dict]:
    """n sft records {messages: [system, user question, assistant reference answer]} with distinct operands."""
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt_of(a, b)},
                          {"role": "assistant", "content": f"= {a + b}"}]} for a, b in operands(n, seed, high)]


def rule_reward(prompt: str, completion: str, row: dict) -> float:
    """GRPO reward (`rayllm.data.verifiable:rule_reward`): 1 when the completion follows the rule for the
    sum the prompt asks, else 0; reads the question from the prompt, as a user's reward would."""
    return float(follows_rule(prompt, completion))


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--high", type=int, default=50, help="operands are below this")
    p.add_argument("--problems", action="store_true", help="prompts with reference answers (sft conversations, for GRPO) instead of pairs")
    args = p.parse_args(argv)
    make = problems if args.problems else pairs
    print(write_jsonl(make(args.pairs, args.seed, args.high), args.out))


if __name__ == "__main__":
    main()
