"""Can this adapter run on this base? The base fingerprint and the adapter's metadata, checked once.

Training writes `rayllm_adapter.json` next to the PEFT files (base fingerprint, rank, target
modules, ...). Serving refuses, with the reason, an adapter trained on another base or with a
rank above the engine's `max_lora_rank`: vLLM would otherwise either fail deep in the engine or,
worse, load it and answer with garbage.

The fingerprint is `rayllm.model.base_fingerprint`, the function training uses to write it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayllm.registry.fingerprint import METADATA_FILE, PEFT_CONFIG_FILE
_UNSERVED_MODULES = {"lm_head", "embed_tokens"}


class AdapterIncompatible(ValueError):
    """The adapter cannot serve on this base; the message says why and is shown to the client."""


@dataclass(frozen=True)
class AdapterFacts:
    rank: int
    target_modules: tuple[str, ...]
    base_fingerprint: str | None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterIncompatible(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterIncompatible(f"{path.name} must hold a JSON object")
    return data


def check_adapter(adapter_dir: str | Path, base_fp: str | None, max_rank: int) -> AdapterFacts:
    """Facts of a local adapter folder, or AdapterIncompatible naming the first reason it cannot serve."""
    adapter_dir = Path(adapter_dir)
    peft = _read_json(adapter_dir / PEFT_CONFIG_FILE)
    if peft is None:
        raise AdapterIncompatible(f"no {PEFT_CONFIG_FILE}: not a PEFT LoRA adapter folder")
    meta = _read_json(adapter_dir / METADATA_FILE) or {}
    rank = peft.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterIncompatible(f"{PEFT_CONFIG_FILE} has no valid rank 'r' (got {rank!r})")
    if "rank" in meta and meta["rank"] != rank:
        raise AdapterIncompatible(f"rank mismatch: {METADATA_FILE} says {meta['rank']}, {PEFT_CONFIG_FILE} says {rank}")
    if rank > max_rank:
        raise AdapterIncompatible(f"rank mismatch: adapter rank {rank} exceeds this server's max_lora_rank {max_rank}")
    fp = meta.get("base_fingerprint")
    if fp is not None and base_fp is not None and fp != base_fp:
        raise AdapterIncompatible(
            f"base fingerprint mismatch: adapter was trained on {fp}, this server's base model is {base_fp}"
        )
    modules = peft.get("target_modules") or []
    if isinstance(modules, str):
        modules = [modules]
    head = [m for m in [*modules, *(peft.get("modules_to_save") or [])] if m.split(".")[-1] in _UNSERVED_MODULES]
    if head:
        raise AdapterIncompatible(f"adapters on {', '.join(sorted(set(head)))} are not served (only attention/MLP projections): "
                                  "vLLM applies them per batch, not per request, when computing prompt logprobs")
    return AdapterFacts(rank=rank, target_modules=tuple(sorted(modules)), base_fingerprint=fp)
