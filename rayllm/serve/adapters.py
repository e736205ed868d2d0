"""What a request's `model` means: the base, a plain adapter folder, or a registry version.

    "base"        the base model (serve.served_model_name)
    "support"     a folder from serve.adapters / the load route, else the newest registry version
    "support@v3"  that registry version (immutable)
    "support:prod" the registry alias, resolved per request with its weights (a canary split)

Registry versions are served (and named in responses) as `name@vN`, so a client always sees the
exact version that answered. Aliases and "newest" are re-read at most every
`serve.registry_refresh_s`, so `rayllm registry promote/rollback` reaches a running endpoint with
no restart. Names follow the registry's rules (no '/', no '..'), so none can reach a path.

What a stream of made-up names costs is bounded: a `model` must match the name grammar in full
(a trailing newline does not), versions have at most 9 digits, a name the registry does not hold
is refused from a cached listing of its names (one storage call per `unknown_model_cache_s`,
whatever the number of names tried), and every cache is an LRU of `model_cache_size` entries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import OrderedDict
from typing import Any

from rayllm.registry.names import AdapterRef, InvalidNameError, RegistryError, validate_name
from rayllm.registry.resolve import Target, pick
from rayllm.serve.errors import ServeError
from rayllm.serve.protocol import AdapterSpec
from rayllm.serve.runtime_adapters import RuntimeAdapter, RuntimeAdapters

logger = logging.getLogger(__name__)


MAX_VERSION_DIGITS = 9
_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
_MODEL = re.compile(rf"{_NAME}(?:@v[1-9][0-9]{{0,{MAX_VERSION_DIGITS - 1}}}|:{_NAME})?")  # always fullmatch
_LONG_VERSION = re.compile(rf"{_NAME}@v[0-9]{{{MAX_VERSION_DIGITS + 1},}}")


class _TTLCache:
    """Entries expire after `ttl_s`; at most `size` are kept, the least recently used dropped first.

    (cachetools.TTLCache does the same, but it is not a dependency of rayllm and this is all we need.)
    """

    def __init__(self, ttl_s: float, size: int = 1024):
        self.ttl_s = ttl_s
        self.size = size
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: Any, value: Any, ttl_s: float | None = None) -> Any:
        self._items[key] = (time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s), value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def check_adapter_name(name: Any) -> str:
    """A name for the load route / config: the registry's rules, reported as a 400."""
    try:
        name = validate_name(name, "lora_name")
    except InvalidNameError as e:
        raise ServeError(400, str(e), "lora_name") from None
    if not re.fullmatch(_NAME, name):
        raise ServeError(400, f"lora_name {name[:80]!r} is invalid: use 1-64 lowercase letters, digits, '.', '_', '-'", "lora_name")
    return name


class AdapterCatalog:
    """Turns `model` strings into AdapterSpecs; holds the folder adapters and a view of the registry."""

    def __init__(self, base_name: str, folders: dict[str, str] | None = None, registry_root: str | None = None,
                 refresh_s: float = 1.0, rng: random.Random | None = None, cache_size: int = 1024,
                 names_ttl_s: float = 1.0, runtime: RuntimeAdapters | None = None,
                 lora_roots: tuple[str, ...] | None = None):
        self.base_name = base_name
        self.folders: dict[str, AdapterSpec] = {  # serve.adapters; see served_folders() for what is served
            check_adapter_name(n): AdapterSpec(n, src, generation=0) for n, src in (folders or {}).items()
        }
        self.runtime = runtime or RuntimeAdapters(None)
        self.lora_roots = lora_roots  # None: not re-checked (the record was written by this process)
        self._served: tuple[Any, dict[str, AdapterSpec]] = (None, {})
        self.registry_root = registry_root
        self._registry: Any = None
        self._rng = rng or random.Random()
        self._cache = _TTLCache(refresh_s, cache_size)
        self._names = _TTLCache(names_ttl_s, 1)  # the registry's adapter names: unknown ones cost no storage call
        self._versions = _TTLCache(float("inf"), cache_size)  # "name@vN" -> spec; versions are immutable

    @property
    def registry(self) -> Any:
        if self._registry is None and self.registry_root:
            from rayllm.registry.store import Registry

            self._registry = Registry(self.registry_root)
        return self._registry

    async def resolve(self, model: str | None, scope: Any = None) -> AdapterSpec | None:
        """None for the base model; raises 404 for an unknown model, 400 for an invalid name.

        `scope` (auth.Scope, None: everything): a name outside it is a 404 like an unknown one,
        decided before anything is looked up, so neither the answer nor its timing tells it exists.
        """
        if model is None or model == self.base_name:
            if scope is not None and not scope.allows(None):
                raise self._not_found(self.base_name if model is None else model)
            return None
        if not isinstance(model, str):
            raise ServeError(400, "model must be a string", "model")
        try:
            if _LONG_VERSION.fullmatch(model):
                raise InvalidNameError(f"versions have at most {MAX_VERSION_DIGITS} digits")
            ref = AdapterRef.parse(model)
            if not _MODEL.fullmatch(model):
                raise InvalidNameError("use name, name@vN or name:alias (lowercase letters, digits, '.', '_', '-')")
        except InvalidNameError as e:
            if any(bad in model for bad in ("/", "\\", "..", "\n", "\x00")) or _LONG_VERSION.fullmatch(model):
                raise ServeError(400, f"invalid model name {model[:80]!r}: {e}", "model") from None
            raise self._not_found(model) from None
        if scope is not None and not scope.allows(ref.name):
            raise self._not_found(model)
        if ref.version is None and ref.alias is None:
            folder = self.served_folders().get(ref.name)
            if folder is not None:
                return folder
        if self.registry is None or ref.name not in await self._registry_names():
            raise self._not_found(model)
        targets = self._cache.get(ref)
        if targets is None:  # an alias's split or the newest version, re-read every refresh_s
            targets = self._cache.put(ref, await asyncio.to_thread(self._targets, ref))
        if not targets:
            raise self._not_found(model)
        return await self._version(AdapterRef.of_version(ref.name, pick(targets, self._rng)), model)

    async def _registry_names(self) -> frozenset[str]:
        names = self._names.get("names")
        if names is None:
            names = self._names.put("names", frozenset(await asyncio.to_thread(self.registry.names)))
        return names

    def _targets(self, ref: AdapterRef) -> tuple:
        """What `ref` points at now, () when nothing. A version or alias is looked up in its name's
        listing (cached per name), so made-up versions and aliases of a real name cost no storage
        call each either."""
        try:
            if ref.alias is not None:
                alias = self._per_name("aliases", ref.name).get(ref.alias)
                return alias.targets if alias is not None else ()
            if ref.version is not None:
                return (Target(ref.version),) if ref.version in self._per_name("versions", ref.name) else ()
            return self.registry.targets(ref)
        except RegistryError:
            return ()  # cached like any answer: an unknown name is not looked up on every request

    def _per_name(self, what: str, name: str) -> Any:
        """The committed versions (a set) or the aliases (by alias) of one name, re-read every refresh_s."""
        found = self._cache.get((what, name))
        if found is None:
            if what == "versions":
                found = frozenset(self.registry.versions(name))
            else:
                found = {a.alias: a for a in self.registry.aliases(name)}
            self._cache.put((what, name), found)
        return found

    async def _version(self, ref: AdapterRef, asked: str) -> AdapterSpec:
        """The spec of one immutable version; its manifest is read once (the replica verifies the files)."""
        spec = self._versions.get(str(ref))
        if spec is None:
            try:
                resolved = await asyncio.to_thread(self.registry.resolve, ref, None, False)
            except RegistryError as e:
                if ref.version in await asyncio.to_thread(self._versions_of, ref.name):  # committed, but unreadable
                    logger.error("%s refused: %s", ref, e)
                    raise ServeError(502, f"model `{asked}` failed its integrity check in the registry and is not served",
                                     "model") from None
                raise self._not_found(asked) from None
            spec = self._versions.put(str(ref), AdapterSpec(str(ref), resolved.path, registry_root=self.registry_root))
        return spec

    def _listing(self) -> list:
        """The registry's versions and aliases, name by name: one unreadable name is left out (and
        logged), not the whole listing."""
        rows = []
        for name in self.registry.names():
            try:
                rows += self.registry.list(name)
            except RegistryError as e:
                logger.error("/v1/models leaves out %s: %s", name, e)
        return rows

    def _versions_of(self, name: str) -> list[int]:
        try:
            return self.registry.versions(name)
        except RegistryError:
            return []

    def _not_found(self, model: str) -> ServeError:
        return ServeError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")

    # -- the load / unload routes ----------------------------------------------------------
    def served_folders(self) -> dict[str, AdapterSpec]:
        """Plain adapters served by name: serve.adapters less those unloaded, plus the runtime-loaded
        ones, as every replica sees them (runtime_adapters.py)."""
        state = self.runtime.current()
        if state is not self._served[0]:
            served = {n: s for n, s in self.folders.items() if n not in state.unloaded}
            for name, entry in state.adapters.items():
                if self._still_allowed(name, entry.spec.source):
                    served[name] = entry.spec
            self._served = (state, served)
        return self._served[1]

    def _still_allowed(self, name: str, source: str) -> bool:
        if self.lora_roots is None:
            return True
        from rayllm.serve.folders import check_lora_path

        try:
            check_lora_path(source, self.lora_roots)
        except ServeError:
            logger.warning("runtime-loaded adapter %s is not served: its folder is outside serve.lora_roots", name)
            return False
        return True

    def add_folder(self, name: str, source: str, replace: bool) -> AdapterSpec:
        name = check_adapter_name(name)
        if name == self.base_name:
            raise ServeError(400, f"lora_name '{name}' is the base model's name", "lora_name")
        if name in self.served_folders() and not replace:
            raise ServeError(400, f"adapter '{name}' is already loaded; set load_inplace: true to replace it", "lora_name")
        # A generation that only grows (also across replicas and restarts) marks the newer weights.
        return AdapterSpec(name, source, generation=time.time_ns())

    async def commit_folder(self, spec: AdapterSpec, scope: Any, replace: bool) -> None:
        """Record a loaded folder for every replica; `scope` (auth.Scope, None: the global admin) loaded it."""
        tenant = scope.tenant if scope is not None else None
        entry = RuntimeAdapter(spec, f"tenant:{tenant}" if tenant else "admin", tenant, time.time())
        await asyncio.to_thread(self.runtime.record, entry, replace)

    async def remove_folder(self, name: str) -> bool:
        """Stop serving the folder adapter `name` on every replica; False when none was served."""
        if name not in self.served_folders() and name not in self.runtime.current().adapters:
            return False
        return await asyncio.to_thread(self.runtime.remove, name, name in self.folders)

    # -- /v1/models -----------------------------------------------------------------------------
    # Cards name models only: no folder, bucket or registry path reaches a caller.
    async def model_cards(self, scope: Any = None) -> list[dict[str, Any]]:
        """Every servable model, or only those `scope` (auth.Scope) may call."""
        cards = await self._all_cards()
        if scope is None:
            return cards
        return [c for c in cards if scope.allows(None if c["id"] == self.base_name else c.get("adapter", c["id"]))]

    async def _all_cards(self) -> list[dict[str, Any]]:
        cards: list[dict[str, Any]] = [{"id": self.base_name, "object": "model", "owned_by": "rayllm", "root": self.base_name}]
        folders = self.served_folders()
        for name, spec in sorted(folders.items()):
            cards.append({"id": name, "object": "model", "owned_by": "rayllm", "parent": self.base_name, "root": name})
        if self.registry is not None:
            listed = self._cache.get("list")
            if listed is None:
                listed = self._cache.put("list", await asyncio.to_thread(self._listing))
            by_name: dict[str, list] = {}
            for resolved, aliases in listed:
                by_name.setdefault(resolved.name, []).append((resolved, aliases))
            for name, rows in by_name.items():  # per name: newest, each version, each alias
                if name not in folders:
                    cards.append({"id": name, "object": "model", "owned_by": "rayllm", "parent": self.base_name,
                                  "adapter": name, "version": f"v{rows[-1][0].version}"})
                aliases = {a.ref: a for _, row_aliases in rows for a in row_aliases}
                for resolved, _ in rows:
                    cards.append({"id": resolved.ref, "object": "model", "owned_by": "rayllm", "parent": self.base_name,
                                  "root": resolved.ref, "adapter": name, "version": f"v{resolved.version}"})
                for ref, a in sorted(aliases.items()):
                    cards.append({"id": ref, "object": "model", "owned_by": "rayllm", "parent": self.base_name,
                                  "adapter": name, "targets": {str(AdapterRef.of_version(name, v)): share
                                                                for v, share in a.shares().items()}})
        return cards
