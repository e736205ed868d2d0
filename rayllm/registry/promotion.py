"""When a sweep's new version may take over an alias: the promotion policy on top of the store.

It lives apart from the store and the alias files it reads (store.py, resolve.py) so the
dependency runs one way: policy → store → aliases → names.
"""

from __future__ import annotations

import math
from typing import Callable

from rayllm.registry.names import AdapterRef, RegistryError
from rayllm.registry.store import Registry


def _metric(registry: Registry, ref: AdapterRef, metric: str) -> float | None:
    """The version's finite `metric` from its manifest, or None (missing, not a number, nan/inf)."""
    value = registry.resolve(ref, verify=False).manifest.get("metrics", {}).get(metric)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def promote_if_better(registry: Registry, name: str, alias: str, version: int | str,
                      metric: str = "val_loss", margin: float = 0.0, lower_is_better: bool = True,
                      move: Callable[[AdapterRef, int], object] | None = None) -> bool:
    """Point `name:alias` at `version` when its metric beats the alias's current version by >= margin.

    Sweeps call this after publishing their best trial. It never disturbs a weighted split
    (a canary is a person's decision) and never promotes on a tie, so rerunning a sweep
    that found nothing better leaves production alone. Returns whether the alias moved.

    `move(alias_ref, version)` moves the alias (default: `registry.promote`, no gate); sweeps pass
    the promotion gate (registry/gate.py), whose refusal propagates with the alias untouched.
    """
    if margin < 0:
        raise ValueError(f"margin {margin} is negative; use 0 or more")
    alias_ref, new = AdapterRef.of_alias(name, alias), AdapterRef.of_version(name, version)
    new_value = _metric(registry, new, metric)
    if new_value is None:
        raise RegistryError(f"{new} has no finite metric {metric!r} to compare; publish it with metrics")
    move = move or registry.promote
    current = registry.get_alias(alias_ref)
    if current is None:
        move(alias_ref, new.version)
        return True
    if len(current.targets) != 1 or current.targets[0].version == new.version:
        return False
    old_value = _metric(registry, AdapterRef.of_version(name, current.targets[0].version), metric)
    if old_value is None:
        return False  # cannot tell which is better: leave the alias where a person put it
    gain = (old_value - new_value) if lower_is_better else (new_value - old_value)
    if gain > 0 and gain >= margin:
        move(alias_ref, new.version)
        return True
    return False
