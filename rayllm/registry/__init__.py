"""Versioned adapter registry: immutable `name@vN` versions with checksums, weighted `name:alias` aliases.

Deliberately light to import (fsspec, json, hashlib): serving and the CLI load it on every start.
"""

from __future__ import annotations

from rayllm.registry.names import InvalidNameError, Ref, RegistryError, parse_ref, validate_alias, validate_name
from rayllm.registry.resolve import Alias, ResolvedAdapter, Target, pick, promote_if_better
from rayllm.registry.store import Registry

__all__ = [
    "Alias",
    "InvalidNameError",
    "Ref",
    "Registry",
    "RegistryError",
    "ResolvedAdapter",
    "Target",
    "parse_ref",
    "pick",
    "promote_if_better",
    "validate_alias",
    "validate_name",
]
