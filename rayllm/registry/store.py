"""The adapter registry: immutable versions and atomically moved aliases on any fsspec filesystem.

Layout under the root (a local folder or e.g. `s3://bucket/prefix`):

    <name>/v3/...               the adapter files of version 3
    <name>/v3/manifest.json     written last: a version without it is invisible (in flight or dead)
    <name>/v3.claim             taken with an exclusive create; never removed, so v3 is never reused
    <name>/_staging/<id>/       a publish copying its files before it claims a number
    <name>/_aliases/<alias>.json  current targets (weighted) and history, replaced in one write

Only two writes must be atomic and both are on every backend: an exclusive create (the claim)
and a whole-file replace (manifest, alias). That is why no lock service is needed.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from fsspec.implementations.local import LocalFileSystem

from rayllm.registry.cas import AliasFiles, WriteConflict
from rayllm.registry.fingerprint import (MANIFEST, adapter_facts, check_file, check_manifest, copy_to_local,
                                         copy_tree_hashed, inside, local_copy_matches, read_json, write_json_atomic)
from rayllm.registry.names import AdapterRef, IntegrityError, RegistryError, is_valid_name, validate_name
from rayllm.registry.resolve import Alias, ResolvedAdapter, Target, TargetSpec, parse_targets, pick, targets_from_history
from rayllm.storage import url_to_fs

RefLike = str | AdapterRef  # every method taking a ref takes the text a user typed or a parsed AdapterRef

# What publish writes into a manifest; `record` adds figures beside these, never over them.
_FACTS = {"schema_version", "name", "version", "created_at", "files", "base_fingerprint", "base_model", "rank",
          "target_modules", "config_hash", "metrics", "source_run"}
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)(\.claim)?$")
_ALIAS_ATTEMPTS = 50  # conditional alias writes retried this often under contention before giving up


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _entry(alias_file: dict[str, Any]) -> dict[str, Any]:
    """An alias file's current targets as a history entry, with the note that explained them."""
    note = alias_file.get("note")
    return {"targets": alias_file.get("targets"), "updated_at": alias_file.get("updated_at", ""),
            **({"note": note} if isinstance(note, dict) else {})}


class Registry:
    """Publish, alias and resolve adapter versions under one root; safe across threads and processes."""

    def __init__(self, root: str, **storage_options: Any) -> None:
        self.fs, self.root = url_to_fs(str(root), **storage_options)
        self.root = self.root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        if self._local:
            os.makedirs(self.root, exist_ok=True)
        self._alias_files = AliasFiles(self.fs, self.root, self._local)

    # -- paths and atomic writes ------------------------------------------------------------
    def url(self, path: str) -> str:
        """What callers get: a plain path on local disk (vLLM wants folders), else a full URL."""
        return path if self._local else self.fs.unstrip_protocol(path)

    def _vdir(self, name: str, version: int) -> str:
        return f"{self.root}/{name}/v{version}"

    def _alias_path(self, name: str, alias: str) -> str:
        return f"{self.root}/{name}/_aliases/{alias}.json"

    def _fresh(self) -> None:
        # Object-store filesystems cache listings; another process may have published since.
        self.fs.invalidate_cache()

    # -- versions ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Adapter names that have at least one entry under the root."""
        self._fresh()
        found = {_base(p) for p in self.fs.ls(self.root, detail=False)} if self.fs.isdir(self.root) else set()
        return sorted(n for n in found if is_valid_name(n))  # stray files are not ours: skipped, not fatal

    def _numbers(self, name: str, committed: bool) -> list[int]:
        ndir = f"{self.root}/{name}"
        if committed:
            paths = [p.rsplit("/", 2)[-2] for p in self.fs.glob(f"{ndir}/v*/{MANIFEST}")]
        else:
            paths = [_base(p) for p in self.fs.ls(ndir, detail=False)] if self.fs.isdir(ndir) else []
        return sorted({int(m.group(1)) for p in paths if (m := _VERSION_DIR.match(p))})

    def versions(self, name: str) -> list[int]:
        """Committed version numbers of `name`, oldest first."""
        validate_name(name)
        self._fresh()
        return self._numbers(name, committed=True)

    def publish(self, name: str, adapter_dir: str, *, metrics: dict[str, Any] | None = None,
                source_run: str | None = None) -> str:
        """Copy an adapter folder in as the next immutable version and return `name@vN`.

        Files are copied (and hashed) into staging before a number is claimed, so a slow or
        failed upload never holds a number; the manifest is written last and makes it visible.
        """
        validate_name(name)
        src_fs, src = url_to_fs(str(adapter_dir))
        src = src.rstrip("/")
        facts = adapter_facts(src_fs, src, metrics=metrics, source_run=source_run)
        staging = f"{self.root}/{name}/_staging/{uuid.uuid4().hex}"
        try:
            files = copy_tree_hashed(src_fs, src, self.fs, staging, mkdirs=self._local)
            version = self._claim(name, staging)
            vdir = self._vdir(name, version)
            if self._local:
                os.rename(staging, vdir)  # atomic; the claim guarantees vdir is free
            else:
                for rel in files:  # server-side copies; invisible until the manifest lands
                    self.fs.copy(f"{staging}/{rel}", f"{vdir}/{rel}")
            manifest = {"schema_version": 1, "name": name, "version": version, "created_at": _now(), **facts, "files": files}
            write_json_atomic(self.fs, f"{vdir}/{MANIFEST}", manifest, self._local)
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        return str(AdapterRef.of_version(name, version))

    def _claim(self, name: str, staging: str) -> int:
        """Take the next free version number with an exclusive create; on a lost race try the next."""
        self._fresh()
        if self._local:
            os.makedirs(f"{self.root}/{name}", exist_ok=True)
        version = max(self._numbers(name, committed=False), default=0) + 1
        while True:
            try:
                with self.fs.open(f"{self.root}/{name}/v{version}.claim", "xb") as f:
                    f.write(json.dumps({"claimed_at": _now(), "staging": _base(staging)}).encode())
                return version
            except FileExistsError:
                version += 1

    def _committed_manifest(self, name: str, version: int, check: bool = True) -> dict[str, Any]:
        """The version's manifest; with `check`, only once its file names and entries are safe to use
        (IntegrityError otherwise). Deleting a version skips the check: a corrupt one must be removable."""
        path, where = f"{self._vdir(name, version)}/{MANIFEST}", str(AdapterRef.of_version(name, version))
        data = read_json(self.fs, path, self.url(path))
        if data is None:
            known = ", ".join(f"v{v}" for v in self._numbers(name, committed=True)) or "none"
            raise RegistryError(f"{where} does not exist (committed versions: {known})")
        if check:
            check_manifest(data, where)
        return data

    def _verify(self, name: str, version: int, manifest: dict[str, Any]) -> None:
        vdir, where = self._vdir(name, version), str(AdapterRef.of_version(name, version))
        files = check_manifest(manifest, where)
        present = {p[len(vdir) + 1:] for p in self.fs.find(vdir)} - {MANIFEST}
        extra = sorted(present - set(files))
        if extra:
            raise IntegrityError(f"{where}: file {extra[0]!r} is not in manifest.json; the stored adapter was modified")
        for rel, expected in files.items():
            check_file(self.fs, inside(vdir, rel, where, self._local), rel, expected, where)

    def targets(self, ref: RefLike) -> tuple[Target, ...]:
        """The version(s) `ref` means now: an alias's weighted targets, the one version, or the newest.

        Serving caches this per ref for `serve.registry_refresh_s` and picks per request.
        """
        r = AdapterRef.parse(ref)
        self._fresh()
        if r.alias is not None:
            return self._alias_or_raise(r.name, r.alias).targets
        if r.version is not None:
            return (Target(r.version),)
        committed = self._numbers(r.name, committed=True)
        if not committed:
            raise RegistryError(f"no published versions of {r.name!r}")
        return (Target(committed[-1]),)

    def resolve(self, ref: RefLike, rng: random.Random | None = None, verify: bool = True) -> ResolvedAdapter:
        """`name@vN` -> that version, `name` -> the newest, `name:alias` -> a weighted pick.

        Checksums are verified by default; verify=False is for reading a manifest (listing,
        comparing metrics), never for handing the files to a model.
        """
        r = AdapterRef.parse(ref)
        for attempt in range(3):
            version = pick(self.targets(r), rng)
            try:
                manifest = self._committed_manifest(r.name, version)
                break
            except RegistryError as e:
                if isinstance(e, IntegrityError) or r.version is not None or attempt == 2:
                    raise
                # the alias or newest version moved under us: read again (targets() refreshes)
        if verify:
            self._verify(r.name, version, manifest)
        return ResolvedAdapter(r.name, version, self.url(self._vdir(r.name, version)), manifest)

    def fetch(self, ref: RefLike, local_dir: str, rng: random.Random | None = None) -> ResolvedAdapter:
        """Copy a version into a local folder (vLLM loads folders), verifying every byte copied.

        A folder that already holds this exact version is reused, so a fetch is paid once.
        """
        resolved = self.resolve(ref, rng=rng, verify=False)
        dest = os.path.abspath(str(local_dir))
        if not local_copy_matches(dest, resolved.manifest):
            copy_to_local(self.fs, self._vdir(resolved.name, resolved.version), resolved.manifest, dest, resolved.ref)
        return ResolvedAdapter(resolved.name, resolved.version, dest, resolved.manifest)

    def localize(self, ref: RefLike, cache_dir: str, rng: random.Random | None = None) -> ResolvedAdapter:
        """A verified local folder for `ref`: the version itself on a local root (re-hashed in place),
        else a verified copy in `cache_dir/name/vN`. What serving hands to vLLM."""
        if self._local:
            return self.resolve(ref, rng=rng, verify=True)
        found = self.resolve(ref, rng=rng, verify=False)  # one weighted pick; fetch then names the exact version
        return self.fetch(found.ref, os.path.join(cache_dir, found.name, f"v{found.version}"))

    def record(self, ref: RefLike, section: str, key: str, value: Any) -> dict[str, Any]:
        """Set `manifest[section][key] = value` on one committed version (figures measured after
        publishing, e.g. `eval`) and return the manifest. The files and their checksums are never
        touched, so `verify` is unaffected; two writers racing on one version: the last one wins."""
        r = AdapterRef.parse(ref)
        if r.version is None:
            raise RegistryError(f"record needs one version, {r.name}@vN, not {str(r)!r}")
        if section in _FACTS:
            raise RegistryError(f"manifest key {section!r} is written at publish time and cannot be changed")
        manifest = self._committed_manifest(r.name, r.version)
        entries = manifest.get(section)
        manifest[section] = {**(entries if isinstance(entries, dict) else {}), key: value}
        write_json_atomic(self.fs, f"{self._vdir(r.name, r.version)}/{MANIFEST}", manifest, self._local)
        return manifest

    # -- aliases ----------------------------------------------------------------------------
    def get_alias(self, alias_ref: RefLike) -> Alias | None:
        """The alias `name:alias`, or None when it was never set."""
        r = AdapterRef.parse_alias(alias_ref)
        name, alias = r.name, r.alias
        self._fresh()
        path = self._alias_path(name, alias)
        data = self._alias_files.read(path, self.url(path))[0]  # on S3 one GET: never half of a concurrent replace
        return None if data is None else Alias.from_json(data, self.url(path))

    def _alias_or_raise(self, name: str, alias: str) -> Alias:
        found = self.get_alias(AdapterRef.of_alias(name, alias))
        if found is None:
            known = ", ".join(a.alias for a in self.aliases(name)) or "none"
            raise RegistryError(f"alias {AdapterRef.of_alias(name, alias)} does not exist (aliases of {name}: {known})")
        return found

    def aliases(self, name: str) -> list[Alias]:
        """Every alias of `name`, sorted by alias."""
        adir = f"{self.root}/{validate_name(name)}/_aliases"
        self._fresh()
        paths = self.fs.glob(f"{adir}/*.json")
        found = [self.get_alias(AdapterRef.of_alias(name, _base(p)[:-5])) for p in sorted(paths)]
        return [a for a in found if a is not None]

    def promote(self, alias_ref: RefLike, targets: TargetSpec, note: dict[str, Any] | None = None) -> Alias:
        """Point `name:alias` at one version (`3`, `"v3"`) or a weighted split (`{3: 90, 4: 10}`).

        `note` (e.g. the promotion gate's figures, or that it was skipped) is kept in the alias file
        with the targets it explains, and moves into the history with them on the next promote.
        """
        r = AdapterRef.parse_alias(alias_ref)
        new = parse_targets(targets)

        def change(old: dict[str, Any] | None, where: str) -> dict[str, Any]:
            for t in new:  # an alias may only ever name complete versions
                self._check_target(r.name, t.version)
            history = [] if old is None else [*Alias.from_json(old, where).history, _entry(old)]
            return {**Alias(r.name, r.alias, new, _now(), history).to_json(), **({"note": note} if note else {})}

        return self._write_alias(r, change)

    def _note(self, name: str, alias: str) -> dict[str, Any] | None:
        """The note kept with an alias's current targets (Alias itself holds targets and history only)."""
        path = self._alias_path(name, alias)
        note = (self._alias_files.read(path, self.url(path))[0] or {}).get("note")
        return note if isinstance(note, dict) else None

    def rollback(self, alias_ref: RefLike, by: str = "rollback") -> Alias:
        """Return `name:alias` to the targets it had before its last promote.

        The targets left are not dropped: the new note records them (with their own note) and who
        rolled back, beside the restored targets' original note; the history itself steps back one
        entry, so rolling back again goes further back.
        """
        r = AdapterRef.parse_alias(alias_ref)

        def change(current: dict[str, Any] | None, where: str) -> dict[str, Any]:
            if current is None:
                known = ", ".join(a.alias for a in self.aliases(r.name)) or "none"
                raise RegistryError(f"alias {r} does not exist (aliases of {r.name}: {known})")
            alias = Alias.from_json(current, where)
            if not alias.history:
                raise RegistryError(f"alias {r} has no earlier target to roll back to")
            entry = alias.history[-1]
            previous = targets_from_history(entry, where)
            for t in previous:  # the earlier version may have been deleted since; say so instead of pointing at nothing
                self._check_target(r.name, t.version)
            note = {"by": by, "rolled_back": _entry(current),
                    **({"restored_note": entry["note"]} if isinstance(entry.get("note"), dict) else {})}
            return {**Alias(r.name, r.alias, previous, _now(), alias.history[:-1]).to_json(), "note": note}

        return self._write_alias(r, change)

    # -- alias writes: no update lost, never an alias on a deleted version ---------------------
    def _deletion_marks(self, name: str, version: int) -> list[str]:
        """The marks of deletes of `name@vN` in progress (`vN.deleting.<id>`, one per delete)."""
        return self.fs.glob(f"{self.root}/{name}/v{version}.deleting.*")

    def _being_deleted(self, name: str, version: int) -> bool:
        return bool(self._deletion_marks(name, version))

    def _check_target(self, name: str, version: int) -> None:
        """Raise unless `name@vN` is committed, sound and not being deleted."""
        self._committed_manifest(name, version)
        marks = self._deletion_marks(name, version)
        if marks:
            raise RegistryError(f"{AdapterRef.of_version(name, version)} is being deleted; an alias cannot move to it "
                                f"(if no delete is running, one was interrupted: remove {self.url(marks[0])})")

    def _write_alias(self, r: AdapterRef, change: Callable[[dict[str, Any] | None, str], dict[str, Any] | None]) -> Alias | None:
        """Replace the alias file with `change(its content now)` (None removes it) without losing a concurrent
        writer's update: under the root's lock on local disk, as a conditional write on S3 (re-read and
        re-applied when another writer won; cas.py). Then every target is checked again: a delete that
        raced the write (on S3 it marks the version, then looks at the aliases) wins, and the alias is put back."""
        path = self._alias_path(r.name, r.alias)
        where = self.url(path)
        for attempt in range(_ALIAS_ATTEMPTS):
            with self._alias_files.lock():
                self._fresh()
                old, token = self._alias_files.read(path, where)
                new = change(old, where)
                try:
                    if new is None:
                        self._alias_files.remove(path, token)
                        return None
                    written = self._alias_files.write(path, new, token, existed=old is not None)
                except WriteConflict:
                    pass
                else:
                    alias = Alias.from_json(new, where)
                    self._recheck(alias, path, old, written)
                    return alias
            time.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))  # jittered: contenders spread out
        raise RegistryError(f"alias {r} changed {_ALIAS_ATTEMPTS} times while this write was tried; try again")

    def _recheck(self, alias: Alias, path: str, old: dict[str, Any] | None, token: str | None) -> None:
        gone = [t.version for t in alias.targets
                if not self.fs.exists(f"{self._vdir(alias.name, t.version)}/{MANIFEST}") or self._being_deleted(alias.name, t.version)]
        if not gone:
            return
        try:
            if old is None:
                self._alias_files.remove(path, token)
            else:
                self._alias_files.write(path, old, token, existed=True)
        except WriteConflict:
            pass  # another writer moved the alias since: its own check covers what it wrote
        raise RegistryError(f"{AdapterRef.of_version(alias.name, gone[0])} was deleted while alias {alias.ref} moved to it; "
                            "the alias was put back")

    # -- listing and deletion -----------------------------------------------------------------
    def list(self, name: str | None = None) -> list[tuple[ResolvedAdapter, list[Alias]]]:
        """Every committed version (of `name`, or of all names) with the aliases pointing at it."""
        rows = []
        for n in [validate_name(name)] if name else self.names():
            aliases = self.aliases(n)
            for v in self._numbers(n, committed=True):
                manifest = read_json(self.fs, f"{self._vdir(n, v)}/{MANIFEST}")
                if manifest is not None:  # deleted between listing and reading
                    pointing = [a for a in aliases if any(t.version == v for t in a.targets)]
                    rows.append((ResolvedAdapter(n, v, self.url(self._vdir(n, v)), manifest), pointing))
        return rows

    def show(self, ref: RefLike, verify: bool = False) -> dict[str, Any]:
        """Everything about one ref as plain data: an alias with its split and history, or a version.

        With verify=True every file of every version involved is re-hashed first.
        """
        r = AdapterRef.parse(ref)
        if r.alias is not None:
            alias = self._alias_or_raise(r.name, r.alias)
            for t in alias.targets:
                self.resolve(AdapterRef.of_version(r.name, t.version), verify=verify)
            shares = {f"v{v}": s for v, s in alias.shares().items()}
            note = self._note(r.name, r.alias)
            return {"ref": alias.ref, "kind": "alias", "verified": verify, "shares": shares, **alias.to_json(),
                    **({"note": note} if note else {})}
        found = self.resolve(r, verify=verify)
        pointing = [a.ref for a in self.aliases(r.name) if any(t.version == found.version for t in a.targets)]
        return {"ref": found.ref, "kind": "version", "verified": verify, "path": found.path,
                "aliases": pointing, "manifest": found.manifest}

    def delete(self, ref: RefLike) -> None:
        """Delete one version (`name@vN`, refused while an alias points at it) or one alias (`name:alias`)."""
        r = AdapterRef.parse(ref)
        if r.alias is not None:
            def change(current: dict[str, Any] | None, where: str) -> None:
                if current is None:
                    known = ", ".join(a.alias for a in self.aliases(r.name)) or "none"
                    raise RegistryError(f"alias {r} does not exist (aliases of {r.name}: {known})")

            self._write_alias(r, change)
            return
        if r.version is None:
            raise RegistryError(f"delete needs one version or alias: {r.name}@vN or {r.name}:alias, not {str(r)!r}")
        with self._alias_files.lock():  # local disk: no promote runs meanwhile
            self._committed_manifest(r.name, r.version, check=False)
            # Marked before the aliases are read; a promote checks its targets after writing. Whichever
            # writes second sees the other's write, so an alias never ends on a deleted version (S3 has no lock).
            # Each delete has its own mark, so one that gives up never unmarks another still going on.
            mark = f"{self.root}/{r.name}/v{r.version}.deleting.{uuid.uuid4().hex}"
            self.fs.pipe_file(mark, json.dumps({"deleting_since": _now()}).encode())
            try:
                self._fresh()
                for a in self.aliases(r.name):
                    if any(t.version == r.version for t in a.targets):
                        raise RegistryError(f"{r} is the target of alias {a.ref} ({a.describe()}); move the alias first")
                vdir = self._vdir(r.name, r.version)
                try:
                    self.fs.rm(f"{vdir}/{MANIFEST}")  # invisible first, then the files go
                except FileNotFoundError:
                    raise RegistryError(f"{r} does not exist (another delete removed it meanwhile)") from None
                try:
                    self.fs.rm(vdir, recursive=True)
                except FileNotFoundError:
                    pass  # a concurrent delete of the same version is removing the files too
            finally:
                self.fs.rm(mark)
