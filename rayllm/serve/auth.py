"""API keys: one set for /v1/* inference and listing, a separate admin key for adapter management,
and tenants (`serve.tenants`): keys scoped to the adapter names they may call, list and manage.

Keys come from the config and from the environment (`RAYLLM_API_KEYS`, comma separated;
`RAYLLM_ADMIN_KEY`), so secrets need not live in YAML. Every comparison is constant-time and
checks all keys, so response timing says nothing about how much of a key was right.

A tenant's key sees only its own adapters: another tenant's name answers exactly as an unknown
one does (404), so names do not leak; its admin key loads and unloads only its own names.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from rayllm.serve.errors import ServeError


def _plain(key: Any) -> str:
    return key.get_secret_value() if hasattr(key, "get_secret_value") else key


@dataclass(frozen=True)
class Scope:
    """What one tenant's key may reach; None in its place means everything (a global key, or open)."""

    tenant: str
    adapters: frozenset[str]
    base: bool = True

    def allows(self, name: str | None) -> bool:
        """`name`: an adapter name (`support`, never `support@v2`), or None for the base model."""
        return self.base if name is None else name in self.adapters


@dataclass(frozen=True)
class Tenant:
    scope: Scope
    keys: tuple[str, ...] = field(repr=False)
    admin: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Keys:
    api: tuple[str, ...] = field(default=(), repr=False)  # empty (and no tenants): /v1/* is open
    admin: str | None = field(default=None, repr=False)  # None (and no tenant admin): admin routes are off (404)
    tenants: tuple[Tenant, ...] = ()

    @classmethod
    def from_config(cls, api_keys: list[Any], admin_key: Any | None, env: dict[str, str] | None = None,
                    tenants: dict[str, Any] | None = None) -> "Keys":
        """Keys from the config (plain strings or pydantic SecretStr) and the environment."""
        env = os.environ if env is None else env
        extra = [k.strip() for k in env.get("RAYLLM_API_KEYS", "").split(",") if k.strip()]
        admin = (_plain(admin_key) if admin_key else None) or env.get("RAYLLM_ADMIN_KEY") or None
        scoped = tuple(Tenant(Scope(name, frozenset(t.adapters), t.base), tuple(map(_plain, t.keys)),
                              _plain(t.admin_key) if t.admin_key else None) for name, t in (tenants or {}).items())
        return cls(api=tuple(dict.fromkeys([*map(_plain, api_keys), *extra])), admin=admin, tenants=scoped)

    @property
    def guarded(self) -> bool:
        return bool(self.api or self.tenants)


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


def _tenant_of(token: str, keys: Keys, admin: bool) -> Tenant | None:
    found = None
    for t in keys.tenants:  # every tenant is checked: no early exit here either
        if _matches(token, ((t.admin,) if t.admin else ()) if admin else t.keys + ((t.admin,) if t.admin else ())):
            found = found or t
    return found


def require_api_key(keys: Keys, authorization: str | None) -> Scope | None:
    """The caller's scope (None: everything); 401 unless the request carries an API key, an admin
    key or a tenant's key; no keys configured: open."""
    if not keys.guarded:
        return None
    token = _presented(authorization)
    if token is None:
        raise ServeError(401, "missing API key: send 'Authorization: Bearer <key>'")
    tenant = _tenant_of(token, keys, admin=False)
    if _matches(token, keys.api + ((keys.admin,) if keys.admin else ())):
        return None
    if tenant is None:
        raise ServeError(401, "invalid API key")
    return tenant.scope


def require_admin_key(keys: Keys, authorization: str | None) -> Scope | None:
    """Admin routes: 404 while no admin key is configured (they do not exist), else 401 / 403; the
    scope a tenant's admin key may manage (None: the global admin key, everything)."""
    if not keys.admin and not any(t.admin for t in keys.tenants):
        raise ServeError(404, "adapter management is disabled: set serve.admin_key or RAYLLM_ADMIN_KEY to enable it")
    token = _presented(authorization)
    if token is None:
        raise ServeError(401, "missing admin key: send 'Authorization: Bearer <admin key>'")
    tenant = _tenant_of(token, keys, admin=True)
    if keys.admin and _matches(token, (keys.admin,)):
        return None
    if tenant is not None:
        return tenant.scope
    if _matches(token, keys.api) or _tenant_of(token, keys, admin=False) is not None:
        raise ServeError(403, "this API key may not manage adapters; use the admin key")
    raise ServeError(401, "invalid admin key")


def require_own_adapter(scope: Scope | None, name: Any) -> None:
    """A tenant's admin key manages only its own adapter names (403 for any other, known or not)."""
    if scope is not None and not (isinstance(name, str) and name.partition("@")[0] in scope.adapters):
        raise ServeError(403, f"this key manages only the adapters of tenant '{scope.tenant}'", "lora_name")
