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
# Used with fullmatch: `$` alone would accept a trailing newline ("prod\n").
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VERSION_RE = re.compile(r"v([1-9][0-9]*)")


class RegistryError(Exception):
    """Anything the registry refuses or cannot do: the message names the ref, file or alias."""


class IntegrityError(RegistryError):
    """A stored version that cannot be trusted: a checksum mismatch, a missing or extra file, or a
    manifest that is malformed or names a file outside its version folder. The fault is in storage,
    not in what the caller asked for; the message names the version and the file."""


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
    if not _NAME_RE.fullmatch(name):
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
    if _VERSION_RE.fullmatch(alias):
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
    m = _VERSION_RE.fullmatch(s) or _VERSION_RE.fullmatch("v" + s)
    if not m:
        raise InvalidNameError(f"version {text!r} is not of the form vN (N >= 1, e.g. v3)")
    return int(m.group(1))


@dataclass(frozen=True)
class AdapterRef:
    """What a user or a caller names: `name` (newest version), `name@vN` or `name:alias`.

    The only way a ref is built (`of_version`, `of_alias`, `parse`) and printed (`str`): every
    field is validated on construction, so a ref that exists is one the registry can store.
    """

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidNameError(f"ref {self.name!r} has both a version and an alias; use name@vN or name:alias")
        if self.version is not None:
            object.__setattr__(self, "version", parse_version(self.version))
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def of_version(cls, name: str, version: int | str) -> "AdapterRef":
        """`name@vN`: one immutable version."""
        return cls(name, version=parse_version(version))

    @classmethod
    def of_alias(cls, name: str, alias: str) -> "AdapterRef":
        """`name:alias`: whatever the alias points at now."""
        return cls(name, alias=alias)

    @classmethod
    def parse(cls, text: "str | AdapterRef") -> "AdapterRef":
        """Parse `name`, `name@vN` or `name:alias`, raising with the part that is wrong (a ref passes through)."""
        if isinstance(text, AdapterRef):
            return text
        if not isinstance(text, str) or not text:
            raise InvalidNameError(f"ref {text!r} is empty; use name, name@vN or name:alias")
        if "@" in text and ":" in text:
            raise InvalidNameError(f"ref {text!r} has both '@' and ':'; use name@vN or name:alias, not both")
        if "@" in text:
            name, _, version = text.partition("@")
            if "@" in version:
                raise InvalidNameError(f"ref {text!r} has more than one '@'")
            if not version.startswith("v"):
                raise InvalidNameError(f"ref {text!r}: version {version!r} must be vN, e.g. {name}@v1")
            return cls.of_version(name, version)
        if ":" in text:
            name, _, alias = text.partition(":")
            if ":" in alias:
                raise InvalidNameError(f"ref {text!r} has more than one ':'")
            return cls.of_alias(name, alias)
        return cls(text)

    @classmethod
    def parse_alias(cls, text: "str | AdapterRef") -> "AdapterRef":
        """`name:alias` only; anything else is refused with an example of the right form."""
        ref = cls.parse(text)
        if ref.alias is None:
            raise InvalidNameError(f"{text!r} is not an alias ref; use name:alias, e.g. {ref.name}:prod")
        return ref

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        if self.alias is not None:
            return f"{self.name}:{self.alias}"
        return self.name
