"""API keys: one set for /v1/* inference and listing, a separate admin key for adapter management.

Keys come from the config and from the environment (`RAYLLM_API_KEYS`, comma separated;
`RAYLLM_ADMIN_KEY`), so secrets need not live in YAML. Every comparison is constant-time and
checks all keys, so response timing says nothing about how much of a key was right.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from rayllm.serve.errors import ServeError


@dataclass(frozen=True)
class Keys:
    api: tuple[str, ...] = ()  # empty: /v1/* is open
    admin: str | None = None  # None: admin routes are off (404)

    @classmethod
    def from_config(cls, api_keys: list[str], admin_key: str | None, env: dict[str, str] | None = None) -> "Keys":
        env = os.environ if env is None else env
        extra = [k.strip() for k in env.get("RAYLLM_API_KEYS", "").split(",") if k.strip()]
        admin = admin_key or env.get("RAYLLM_ADMIN_KEY") or None
        return cls(api=tuple(dict.fromkeys([*api_keys, *extra])), admin=admin)


def _presented(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


def require_api_key(keys: Keys, authorization: str | None) -> None:
    """Raise 401 unless the request carries one of the API keys (or the admin key); no keys: open."""
    if not keys.api:
        return
    token = _presented(authorization)
    if token is None:
        raise ServeError(401, "missing API key: send 'Authorization: Bearer <key>'")
    if not _matches(token, keys.api + ((keys.admin,) if keys.admin else ())):
        raise ServeError(401, "invalid API key")


def require_admin_key(keys: Keys, authorization: str | None) -> None:
    """Admin routes: 404 while no admin key is configured (they do not exist), else 401 / 403."""
    if not keys.admin:
        raise ServeError(404, "adapter management is disabled: set serve.admin_key or RAYLLM_ADMIN_KEY to enable it")
    token = _presented(authorization)
    if token is None:
        raise ServeError(401, "missing admin key: send 'Authorization: Bearer <admin key>'")
    if not _matches(token, (keys.admin,)):
        if _matches(token, keys.api):
            raise ServeError(403, "this API key may not manage adapters; use the admin key")
        raise ServeError(401, "invalid admin key")
