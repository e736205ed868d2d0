"""Rewards from code for GRPO: built-ins and user functions, weighted, failures counted by name.

Every reward is called as `fn(prompt, completion, row) -> float`: the built-ins below and a user's
function named by import path (`package.module:function`, as TRL's `reward_funcs` takes callables).
`row` is the prompt's row (`prompt`, `answer`) plus the completion's `completion_tokens`. A reward
that raises, or returns something that is not a finite number, scores 0 for that completion and is
counted under its name (`reward_errors/<name>`): one bad row or a bug in a user's function must not
end a run that has been generating for an hour.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from rayllm.config.train import RewardConfig

RewardFn = Callable[[str, str, dict], float]


def normalise(text: str) -> str:
    """Case, runs of whitespace, surrounding quotes and a trailing period do not count."""
    text = " ".join(str(text).strip().lower().split())
    return text.strip("\"'`").rstrip(".").strip()


def exact_match(prompt: str, completion: str, row: dict) -> float:
    """1 when the completion equals the row's reference answer after normalisation, else 0."""
    return float(normalise(completion) == normalise(row["answer"]))


def regex_reward(pattern: str) -> RewardFn:
    """1 when `pattern` is found in the completion (a format check), else 0."""
    compiled = re.compile(pattern)
    return lambda prompt, completion, row: float(compiled.search(completion) is not None)


def length_penalty(target_tokens: int, max_new_tokens: int) -> RewardFn:
    """-(tokens beyond target_tokens) / max_new_tokens: 0 for a short enough completion, -1 at worst."""
    return lambda prompt, completion, row: -max(0, row["completion_tokens"] - target_tokens) / max_new_tokens


def import_function(path: str) -> RewardFn:
    """The callable that `package.module:function` names."""
    module, _, name = path.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"reward function {path}: {module} has no callable {name!r}")
    return fn


def build(cfg: RewardConfig, max_new_tokens: int) -> RewardFn:
    if cfg.kind == "exact_match":
        return exact_match
    if cfg.kind == "regex":
        return regex_reward(cfg.pattern)
    if cfg.kind == "length_penalty":
        return length_penalty(cfg.target_tokens, max_new_tokens)
    return import_function(cfg.function)


@dataclass
class Scores:
    """One batch of completions scored: the weighted total per completion, each reward's raw values
    (0 where it failed) and how many times each reward failed."""

    total: list[float]
    per_reward: dict[str, list[float]]
    errors: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


class Scorer:
    """The configured rewards of a run, resolved once (an import path that does not import fails the
    run at start, before any generation)."""

    def __init__(self, configs: list[RewardConfig], max_new_tokens: int):
        self.items = [(c.label, c.weight, build(c, max_new_tokens)) for c in configs]

    def score(self, prompts: list[str], completions: list[str], rows: list[dict]) -> Scores:
        per: dict[str, list[float]] = {name: [] for name, _, _ in self.items}
        errors: dict[str, int] = {}
        last: dict[str, str] = {}
        for prompt, completion, row in zip(prompts, completions, rows):
            for name, _, fn in self.items:
                try:
                    value = float(fn(prompt, completion, row))
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                except Exception as exc:  # noqa: BLE001 - a reward's failure is scored and counted, never fatal
                    value = 0.0
                    errors[name] = errors.get(name, 0) + 1
                    last[name] = f"{type(exc).__name__}: {exc}"
                per[name].append(value)
        total = [sum(w * per[name][i] for name, w, _ in self.items) for i in range(len(completions))]
        return Scores(total, per, errors, last)
