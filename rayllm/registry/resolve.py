"""Aliases: a name for "the version(s) traffic goes to now", with weights and a history.

An alias file holds its current targets (one version, or several with weights for a canary
or an A/B test) and the targets it had before, so `rollback` is one step back instead of a
guess. `pick` turns the weights into one version per request; it takes the caller's RNG so a
split can be replayed exactly in tests and simulations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from rayllm.registry.names import AdapterRef, InvalidNameError, RegistryError, parse_version, validate_alias, validate_name

HISTORY_LIMIT = 100  # alias files stay small: they are read on every resolve
TargetSpec = Union[int, str, Mapping[Union[int, str], float], Sequence[Union[int, str, tuple[Union[int, str], float]]]]


@dataclass(frozen=True)
class Target:
    """One version an alias sends traffic to, with a relative (unnormalised) weight."""

    version: int
    weight: float = 1.0


@dataclass
class Alias:
    """The content of one alias file: current targets first, older target sets in `history`."""

    name: str
    alias: str
    targets: tuple[Target, ...]
    updated_at: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"targets": [...], "updated_at": ...}], oldest first

    @property
    def ref(self) -> str:
        return str(AdapterRef.of_alias(self.name, self.alias))

    def shares(self) -> dict[int, float]:
        """Fraction of traffic per version (weights normalised to sum to 1)."""
        total = sum(t.weight for t in self.targets)
        return {t.version: t.weight / total for t in self.targets}

    def describe(self) -> str:
        """`v3` for a single target, `v3 90% / v4 10%` for a split."""
        if len(self.targets) == 1:
            return f"v{self.targets[0].version}"
        return " / ".join(f"v{v} {100 * s:.4g}%" for v, s in self.shares().items())

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": 1, "name": self.name, "alias": self.alias, "updated_at": self.updated_at,
                "targets": _targets_json(self.targets), "history": self.history[-HISTORY_LIMIT:]}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "Alias":
        try:
            targets = tuple(Target(int(t["version"]), float(t["weight"])) for t in data["targets"])
            return cls(validate_name(data["name"]), validate_alias(data["alias"]), check_targets(targets),
                       str(data.get("updated_at", "")), list(data.get("history", [])))
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"{where}: malformed alias file ({e})") from e


def _targets_json(targets: Sequence[Target]) -> list[dict[str, Any]]:
    return [{"version": t.version, "weight": t.weight} for t in targets]


def targets_from_history(entry: dict[str, Any], where: str) -> tuple[Target, ...]:
    """The targets recorded in one history entry."""
    try:
        return check_targets(tuple(Target(int(t["version"]), float(t["weight"])) for t in entry["targets"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"{where}: malformed alias history entry ({e})") from e


def check_targets(targets: tuple[Target, ...]) -> tuple[Target, ...]:
    """Refuse empty, duplicate, non-positive or non-finite weights: each would make `pick` lie."""
    if not targets:
        raise InvalidNameError("an alias needs at least one version")
    seen: set[int] = set()
    for t in targets:
        parse_version(t.version)
        if not (math.isfinite(t.weight) and t.weight > 0):
            raise InvalidNameError(f"weight of v{t.version} is {t.weight}; weights must be positive numbers")
        if t.version in seen:
            raise InvalidNameError(f"v{t.version} appears twice in the alias targets")
        seen.add(t.version)
    return targets


def _one(item: int | str | tuple[int | str, float]) -> Target:
    if isinstance(item, tuple):
        version, weight = item
        return Target(parse_version(version), float(weight))
    if isinstance(item, str) and "=" in item:
        version, _, weight = item.partition("=")
        try:
            return Target(parse_version(version), float(weight))
        except ValueError as e:
            raise InvalidNameError(f"target {item!r}: weight {weight!r} is not a number") from e
    return Target(parse_version(item))


def parse_targets(spec: TargetSpec) -> tuple[Target, ...]:
    """Accept `3`, `"v3"`, `{3: 90, 4: 10}`, `["v3=90", "v4=10"]` or `[(3, 0.9), (4, 0.1)]`."""
    if isinstance(spec, Mapping):
        targets = tuple(Target(parse_version(v), float(w)) for v, w in spec.items())
    elif isinstance(spec, (int, str)):
        targets = (_one(spec),)
    else:
        targets = tuple(_one(item) for item in spec)
    return check_targets(targets)


def pick(targets: Sequence[Target], rng: random.Random | None = None) -> int:
    """Choose one version with probability proportional to its weight."""
    if len(targets) == 1:
        return targets[0].version
    x = (rng or random).random() * sum(t.weight for t in targets)
    for t in targets:
        x -= t.weight
        if x < 0:
            return t.version
    return targets[-1].version  # float rounding left x at ~0


@dataclass(frozen=True)
class ResolvedAdapter:
    """One concrete version a ref resolved to: `path` is a local folder or an fsspec URL."""

    name: str
    version: int
    path: str
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return str(AdapterRef.of_version(self.name, self.version))
