"""The storage root: where every artifact one stage hands to the next lives.

On a cluster each job runs in its own copy of the working directory (`ray job submit
--working-dir .`), so a relative `runs/...` path would land in a throwaway folder on one node.
`storage` (or the RAYLLM_STORAGE environment variable) names a root that every node sees — a
shared filesystem such as NFS/EFS/Lustre, or an object-store URI for run dirs and the registry — and every
relative artifact path in the config is resolved against it. Raw inputs (`data.inputs`) stay
relative to the working directory, where a job's own files are.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from rayllm.storage import is_uri

ENV = "RAYLLM_STORAGE"
KEYWORDS = {"smollm2", "botchan"}  # shorthand names, not paths

# Artifact paths by section: what a stage writes, or reads from an earlier stage.
ARTIFACT_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("output_dir", "tokenizer.path"),
    "model": ("path",),
    "train": ("dataset", "output_dir"),
    "tune": ("output_dir",),
    "registry": ("path", "cache_dir"),
    "serve": ("model", "stage_dir", "state_dir", "adapters"),
    "eval": ("dataset", "output_dir"),  # target paths: resolved by rayllm.eval.targets
}
# Keys whose stage reads and writes local files (through Ray Train, vLLM or a tokenizer); they
# may not resolve to an object-store URI.
LOCAL_ONLY = {"data.output_dir", "data.tokenizer.path", "model.path", "train.dataset",
              "tune.output_dir", "serve.model", "serve.stage_dir", "serve.state_dir", "eval.dataset", "eval.output_dir"}  # serve.adapters folders may be remote URIs


def resolve(root: str, value: str) -> str:
    """`value` joined to `root` when it is a relative path; absolute paths, URIs and keywords as they are."""
    if not value or value in KEYWORDS or is_uri(value) or value.startswith("~") or os.path.isabs(value):
        return value
    if is_uri(root):
        return posixpath.join(root.rstrip("/"), value)
    return os.path.join(os.path.abspath(os.path.expanduser(root)), value)


def _get(section: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(section, dict):
            return None
        section = section.get(part)
    return section


def _set(section: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        section = section.setdefault(part, {})
    section[last] = value


def apply(raw: dict) -> tuple[dict, list[str]]:
    """A copy of the raw config with artifact paths resolved against the storage root, and the
    problems found (an object-store root for a key that must be a local or shared-disk path)."""
    root = raw.get("storage") or os.environ.get(ENV)
    if not root:
        return raw, []
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    out["storage"] = root
    problems = []
    for name, keys in ARTIFACT_KEYS.items():
        section = out.get(name)
        if name == "registry" and section is None:
            section = out["registry"] = {}
        if not isinstance(section, dict):
            continue
        for key in keys:
            dotted = f"{name}.{key}"
            value = _get(section, key)
            if value is None and name == "registry":
                value = {"path": "runs/registry", "cache_dir": "runs/registry-cache"}[key]  # the defaults are relative too
            if isinstance(value, dict):  # serve.adapters: {name: folder}
                section[key] = {name: resolve(root, path) if isinstance(path, str) else path for name, path in value.items()}
                continue
            if not isinstance(value, str):
                continue
            resolved = resolve(root, value)
            if dotted == "registry.cache_dir" and is_uri(resolved):
                continue  # a local cache of remote versions: stays on the local disk
            if is_uri(resolved) and dotted in LOCAL_ONLY and not is_uri(value):
                problems.append(f"{dotted}: {value!r} would resolve to {resolved!r} under storage {root!r}, but this stage "
                                f"reads and writes local files; give an absolute path on a disk every node mounts, or set "
                                f"storage to such a path (object-store URIs work for train.output_dir and registry.path)")
                continue
            head = key.split(".")[0]
            if isinstance(section.get(head), dict):
                section[head] = dict(section[head])  # never write into the caller's mapping
            _set(section, key, resolved)
    return out, problems
