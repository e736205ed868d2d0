"""Names, versions, aliases and refs of the adapter registry, validated in one place.

Every name the registry turns into a storage path passes through here first, so a name can
never climb out of the registry root (`../x`), hide itself (`.x`) or smuggle in a separator
(`a/b`, `a\\b`). Refs are what users type: `name` (newest version), `name@vN` (one immutable
version) and `name:alias` (whatever the alias points at now).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_NAME_LEN = 64
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(Exception):
    """Anything the registry refuses or cannot do: the message names the ref, file or alias."""


class InvalidNameError(RegistryError, ValueError):
    """A name, alias, version or ref that does not follow the rules (also a ValueError)."""


def validate_name(name: str, kind: str = "name") -> str:
    """Return `name` if it is a safe single path component, else raise naming the bad part."""
    if not isinstance(name, str):
        raise InvalidNameError(f"{kind} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidNameError(f"{kind} is empty; use lowercase letters, digits, '.', '_' or '-'")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(f"{kind} {name[:20]!r}... is {len(name)} characters; at most {MAX_NAME_LEN}")
    for bad, why in (("/", "a path separator"), ("\\", "a path separator"), ("@", "'@' (it starts a version)"),
                     (":", "':' (it starts an alias)"), ("..", "'..' (path traversal)")):
        if bad in name:
            raise InvalidNameError(f"{kind} {name!r} contains {why}")
    if name[0] in "._-":
        raise InvalidNameError(f"{kind} {name!r} starts with {name[0]!r}; it must start with a lowercase letter or digit")
    if not _NAME_RE.match(name):
        bad_chars = sorted({c for c in name if not re.match(r"[a-z0-9._-]", c)})
        hint = " (lowercase only)" if any(c.isupper() for c in bad_chars) else ""
        raise InvalidNameError(f"{kind} {name!r} has characters {''.join(bad_chars)!r}{hint}; allowed: a-z 0-9 . _ -")
    return name


def is_valid_name(name: str) -> bool:
    """True when `name` passes `validate_name` (for skipping foreign entries while listing)."""
    try:
        validate_name(name)
        return True
    except InvalidNameError:
        return False


def validate_alias(alias: str) -> str:
    """An alias follows the name rules and must not look like a version (`v3` would read ambiguously)."""
    validate_name(alias, "alias")
    if _VERSION_RE.match(alias):
        raise InvalidNameError(f"alias {alias!r} looks like a version; pick a word such as 'prod' or 'canary'")
    return alias


def parse_version(text: str | int) -> int:
    """`3`, `"3"` or `"v3"` -> 3; versions start at 1 and have no leading zeros."""
    if isinstance(text, bool):
        raise InvalidNameError(f"version {text!r} is not a version; use vN such as v3")
    if isinstance(text, int):
        if text < 1:
            raise InvalidNameError(f"version {text} is below 1; versions start at v1")
        return text
    s = str(text).strip()
    m = _VERSION_RE.match(s) or _VERSION_RE.match("v" + s)
    if not m:
        raise InvalidNameError(f"version {text!r} is not of the form vN (N >= 1, e.g. v3)")
    return int(m.group(1))


@dataclass(frozen=True)
class Ref:
    """A parsed ref: exactly one of `version` / `alias` is set, or neither (the newest version)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        if self.alias is not None:
            return f"{self.name}:{self.alias}"
        return self.name


def parse_ref(ref: str) -> Ref:
    """Parse `name`, `name@vN` or `name:alias`, raising with the part that is wrong."""
    if not isinstance(ref, str) or not ref:
        raise InvalidNameError(f"ref {ref!r} is empty; use name, name@vN or name:alias")
    if "@" in ref and ":" in ref:
        raise InvalidNameError(f"ref {ref!r} has both '@' and ':'; use name@vN or name:alias, not both")
    if "@" in ref:
        name, _, version = ref.partition("@")
        if "@" in version:
            raise InvalidNameError(f"ref {ref!r} has more than one '@'")
        if not version.startswith("v"):
            raise InvalidNameError(f"ref {ref!r}: version {version!r} must be vN, e.g. {name}@v1")
        return Ref(validate_name(name), version=parse_version(version))
    if ":" in ref:
        name, _, alias = ref.partition(":")
        if ":" in alias:
            raise InvalidNameError(f"ref {ref!r} has more than one ':'")
        return Ref(validate_name(name), alias=validate_alias(alias))
    return Ref(validate_name(ref))


def version_ref(name: str, version: int) -> str:
    """The canonical string of one version, `name@vN`."""
    return f"{validate_name(name)}@v{parse_version(version)}"


def parse_alias_ref(ref: str) -> tuple[str, str]:
    """`name:alias` -> (name, alias); anything else is refused with an example of the right form."""
    r = parse_ref(ref)
    if r.alias is None:
        raise InvalidNameError(f"{ref!r} is not an alias ref; use name:alias, e.g. {r.name}:prod")
    return r.name, r.alias
