"""YAML → validated config, with every error reported at once in words a user can act on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from rayllm.config import RayllmConfig


class ConfigError(ValueError):
    """A config that cannot be used; `problems` holds one line per mistake."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation such as `X`, `X | None` or `list[X]`."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at `loc` (to list its valid keys)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):  # a list index: the item type is already `model`
            continue
        field = model.model_fields.get(part)
        model = _model_class(field.annotation) if field else None
    return model


def _describe(err: dict, root: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        valid = ", ".join(sorted(parent.model_fields)) if parent else "see README"
        return f"{path}: unknown key; valid keys here: {valid}"
    if kind == "missing":
        parent = _model_at(root, loc[:-1])
        field = parent.model_fields.get(str(loc[-1])) if parent else None
        hint = f" ({field.description})" if field and field.description else ""
        return f"{path}: required key is missing{hint}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{path}: {shown} is invalid: {msg}"


def parse_config(raw: Any, source: str = "config") -> "RayllmConfig":
    """Validate an already-parsed mapping; raises ConfigError listing every problem."""
    from rayllm.config import RayllmConfig

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    from rayllm.config import storage

    raw, problems = storage.apply(raw)
    try:
        cfg = RayllmConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, problems + [_describe(e, RayllmConfig) for e in exc.errors()]) from None
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path) -> "RayllmConfig":
    """Read a YAML file and validate it; relative paths inside stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_config(raw, str(path))


def config_hash(section: BaseModel) -> str:
    """A stable short hash of a section's values (defaults included)."""
    blob = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
