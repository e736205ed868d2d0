"""Versioned adapter registry: immutable `name@vN` versions with checksums, weighted `name:alias` aliases.

Deliberately light to import (fsspec, json, hashlib): serving and the CLI load it on every start.
Modules depend one way: promotion → store → resolve (aliases) → names; files come from rayllm.storage.
"""

from __future__ import annotations

from rayllm.registry.names import AdapterRef, IntegrityError, InvalidNameError, RegistryError, validate_alias, validate_name
from rayllm.registry.promotion import promote_if_better
from rayllm.registry.resolve import Alias, ResolvedAdapter, Target, pick
from rayllm.registry.store import Registry

__all__ = [
    "AdapterRef",
    "Alias",
    "IntegrityError",
    "InvalidNameError",
    "Registry",
    "RegistryError",
    "ResolvedAdapter",
    "Target",
    "pick",
    "promote_if_better",
    "validate_alias",
    "validate_name",
]
