"""What `eval.targets` name, resolved before any Ray resource is taken: every target becomes one
local model folder (plus an adapter folder), or one endpoint. A registry ref is pinned to the exact
version it means now (an alias split between versions gives one target per version), so the report
and the manifest name `name@vN`, never a moving alias. Every problem is one line naming the target
(`eval.targets[i]`) and what is wrong."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayllm.config import RayllmConfig
    from rayllm.config.eval import EndpointConfig, TargetConfig


class EvalError(ValueError):
    """An evaluation that cannot run: one line, naming what and where."""


@dataclass(frozen=True)
class Target:
    label: str  # column of the report
    kind: str  # "model" | "adapter" | "endpoint"
    source: str  # what the user wrote: the path, ref or endpoint URL
    model_dir: str | None = None  # HF folder (the base of an adapter)
    adapter_dir: str | None = None
    registry_ref: str | None = None  # name@vN when the target is a registry version
    endpoint: EndpointConfig | None = None
    facts: dict = field(default_factory=dict)  # what the report shows about it (alias, base fingerprint, ...)

    @property
    def local(self) -> bool:
        return self.endpoint is None


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def _base_of(adapter: Path, given: str | None, where: str) -> str:
    base = given
    if base is None:
        for name, key in (("rayllm_adapter.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
            f = adapter / name
            if f.is_file() and (found := json.loads(f.read_text()).get(key)):
                base = found
                break
    if not base:
        raise EvalError(f"{where}: adapter {adapter} names no base model; set base: BASE_FOLDER on this target")
    from rayllm.model import SMOLLM2, resolve_base

    try:
        folder = resolve_base(base) if base == SMOLLM2 or str(base).endswith(".gguf") else Path(base)
    except FileNotFoundError as e:
        raise EvalError(f"{where}: base of adapter {adapter}: {e}") from None
    if not _is_model(Path(folder)):
        raise EvalError(f"{where}: base {base} of adapter {adapter} is not an HF model folder (no config.json); "
                        "set base: BASE_FOLDER on this target")
    return str(Path(folder).resolve())


def from_path(t: TargetConfig, path: str, where: str) -> Target:
    """An HF folder, an adapter folder, or a run directory (its exported model/ or adapter/)."""
    from rayllm.model import SMOLLM2, resolve_base

    if path == SMOLLM2 or path.endswith(".gguf"):
        try:
            folder = resolve_base(path)
        except FileNotFoundError as e:
            raise EvalError(f"{where}: {e}") from None
        return Target(t.label or Path(path).stem, "model", path, model_dir=str(folder))
    folder = Path(path).expanduser()
    if not folder.exists():
        raise EvalError(f"{where}: {path} does not exist (an HF model folder, an adapter folder or a run directory)")
    label = t.label or folder.resolve().name
    if (folder / "result.json").is_file() and not _is_model(folder):  # a run directory
        result = json.loads((folder / "result.json").read_text())
        out = result.get("model_dir") or result.get("adapter_dir")
        found = [f for f in (Path(out) if out else None, folder / "model", folder / "adapter") if f and f.is_dir()]
        if result.get("status") != "finished" or not found:
            raise EvalError(f"{where}: run {path} has no exported model or adapter (status "
                            f"{result.get('status')!r}); finish the run or export a checkpoint with `rayllm export`")
        folder = found[0]
    if (folder / "adapter_config.json").is_file():
        return Target(label, "adapter", path, model_dir=_base_of(folder, t.base, where), adapter_dir=str(folder.resolve()))
    if _is_model(folder):
        return Target(label, "model", path, model_dir=str(folder.resolve()))
    raise EvalError(f"{where}: {path} is not an HF model folder, an adapter folder or a run directory "
                    "(no config.json, adapter_config.json or result.json)")


def from_ref(t: TargetConfig, registry, cache_dir: str, where: str) -> list[Target]:
    """One target per version the ref means now (an alias split gives several), verified and local."""
    from rayllm.registry import AdapterRef, RegistryError

    ref = AdapterRef.parse(t.ref)
    try:
        versions = [x.version for x in registry.targets(ref)]
        out = []
        for v in versions:
            exact = AdapterRef.of_version(ref.name, v)
            found = registry.localize(exact, cache_dir)
            label = t.label if t.label and len(versions) == 1 else str(exact)
            facts = {"ref": t.ref, "version": str(exact), "base_fingerprint": found.manifest.get("base_fingerprint")}
            folder = Path(found.path)
            out.append(Target(label, "adapter", t.ref, model_dir=_base_of(folder, t.base or found.manifest.get("base_model"), where),
                              adapter_dir=str(folder), registry_ref=str(exact), facts=facts))
        return out
    except RegistryError as e:
        raise EvalError(f"{where}: {t.ref}: {e}") from None


def from_endpoint(t: TargetConfig, where: str) -> Target:
    e = t.endpoint
    if e.api_key_env and not os.environ.get(e.api_key_env):
        raise EvalError(f"{where}.endpoint.api_key_env: environment variable {e.api_key_env} is not set")
    if e.tokenizer and not Path(e.tokenizer).is_dir():
        raise EvalError(f"{where}.endpoint.tokenizer: {e.tokenizer} is not a folder")
    return Target(t.label or e.model, "endpoint", e.url, endpoint=e)


def resolve_targets(cfg: RayllmConfig) -> list[Target]:
    """Every target of `cfg.eval`, checked; raises EvalError for the first one that cannot be used.
    Relative target paths resolve against the storage root as the config's own artifact paths do."""
    from rayllm.config import storage as storage_cfg

    registry = None
    out: list[Target] = []
    for i, t in enumerate(cfg.eval.targets):
        where = f"eval.targets[{i}]"
        if t.path is not None:
            path = storage_cfg.resolve(cfg.storage, t.path) if cfg.storage else t.path
            out.append(from_path(t, path, where + ".path"))
        elif t.ref is not None:
            if registry is None:
                from rayllm.registry import Registry

                registry = Registry(cfg.registry.path)
            out.extend(from_ref(t, registry, cfg.registry.cache_dir, where + ".ref"))
        else:
            out.append(from_endpoint(t, where))
    seen: dict[str, int] = {}
    unique = []
    for t in out:  # two targets may end up with one name (a run dir and its adapter folder): number them
        n = seen[t.label] = seen.get(t.label, 0) + 1
        unique.append(t if n == 1 else Target(**{**t.__dict__, "label": f"{t.label}#{n}"}))
    return unique


def check_inputs(cfg: RayllmConfig) -> list[str]:
    """Missing data files named before anything starts (bad rows inside are counted later, not fatal)."""
    e, problems = cfg.eval, []
    if e.dataset is not None and not (Path(e.dataset) / "manifest.json").is_file():
        problems.append(f"eval.dataset: {e.dataset} is not a prepared dataset (no manifest.json); run `rayllm prepare` first")
    for i, task in enumerate(e.generation):
        if not Path(task.path).is_file():
            problems.append(f"eval.generation[{i}].path: {task.path} does not exist (a jsonl file of prompt/messages + reference rows)")
    if e.harness and e.harness.include_path and not Path(e.harness.include_path).is_dir():
        problems.append(f"eval.harness.include_path: {e.harness.include_path} is not a folder of lm-eval task YAML files")
    return problems
