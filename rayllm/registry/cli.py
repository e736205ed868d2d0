"""`rayllm registry ...`: publish, list, show, promote, rollback and delete adapters from a shell.

The verbs are thin: each is one `Registry` call plus a human-readable print, so what a person
does by hand is exactly what sweeps and serving do in code.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from rayllm.registry.names import RegistryError
from rayllm.registry.resolve import Alias
from rayllm.registry.store import Registry

if TYPE_CHECKING:
    from rayllm.config.registry import RegistryConfig

__all__ = ["add_arguments", "run"]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); e.g. '{{\"val_loss\": 1.23}}'") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"val_loss\": 1.23}'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--root` and the registry verbs to `parser` (the lead's `rayllm registry` parser)."""
    parser.add_argument("--root", default=None, help="Registry root (folder or fsspec URI); overrides registry.path.")
    sub = parser.add_subparsers(dest="registry_verb", required=True, metavar="VERB")
    p = sub.add_parser("publish", help="Publish an adapter folder as the next version NAME@vN.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    p.add_argument("--metrics", type=_json_object, default=None, help="JSON object merged over the folder's metrics.")
    p.add_argument("--source-run", default=None, help="Run that produced the adapter (default: from its metadata).")
    p = sub.add_parser("list", help="List versions (of NAME, or of every adapter) with their aliases.")
    p.add_argument("name", nargs="?", default=None, metavar="NAME")
    p = sub.add_parser("show", help="Show a version's manifest or an alias's split and history.")
    p.add_argument("ref", metavar="REF", help="NAME, NAME@vN or NAME:ALIAS")
    p.add_argument("--verify", action="store_true", help="Re-hash every file against the manifest.")
    p = sub.add_parser("promote", help="Point NAME:ALIAS at a version, or split traffic: v3=90 v4=10, once each new "
                                       "version passed the gate (its perplexity through registry.gate.endpoint).")
    p.add_argument("alias_ref", metavar="NAME:ALIAS")
    p.add_argument("targets", nargs="+", metavar="VERSION[=WEIGHT]")
    p.add_argument("--skip-gate", action="store_true", help="Move the alias without measuring; recorded in the alias history.")
    p.add_argument("--endpoint", default=None, help="Endpoint serving this registry; overrides registry.gate.endpoint.")
    p = sub.add_parser("rollback", help="Return NAME:ALIAS to its previous target.")
    p.add_argument("alias_ref", metavar="NAME:ALIAS")
    p = sub.add_parser("delete", help="Delete NAME@vN (refused while an alias points at it) or NAME:ALIAS.")
    p.add_argument("ref", metavar="REF")


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())) or "-"


def _alias_label(alias: Alias, version: int) -> str:
    share = alias.shares()[version]
    return alias.alias if share == 1 else f"{alias.alias} ({100 * share:.4g}%)"


def _print_list(registry: Registry, name: str | None) -> None:
    rows = [[found.name, f"v{found.version}", found.manifest.get("created_at", "-"), str(found.manifest.get("rank", "-")),
             _metrics(found.manifest.get("metrics", {})), ", ".join(_alias_label(a, found.version) for a in aliases) or "-"]
            for found, aliases in registry.list(name)]
    if not rows:
        print(f"no versions of {name!r}" if name else f"registry {registry.url(registry.root)} is empty")
        return
    print(table(["NAME", "VERSION", "CREATED", "RANK", "METRICS", "ALIASES"], rows))


def _print_show(info: dict[str, Any]) -> None:
    if info["kind"] == "alias":
        print(f"{info['ref']}  (updated {info['updated_at']})")
        rows = []
        for t in info["targets"]:
            version = f"v{t['version']}"
            rows.append([version, f"{t['weight']:g}", f"{100 * info['shares'][version]:.4g}%"])
        print(table(["VERSION", "WEIGHT", "SHARE"], rows))
        if info.get("note"):
            print(f"  {_note(info['note'])}")
        for entry in reversed(info["history"]):
            print(f"  before {entry.get('updated_at', '?')}: " + ", ".join(f"v{t['version']}={t['weight']:g}" for t in entry["targets"])
                  + (f"  ({_note(entry['note'])})" if entry.get("note") else ""))
    else:
        m = info["manifest"]
        print(info["ref"])
        for key in ("path", "aliases"):
            print(f"  {key:<17} {', '.join(info[key]) if isinstance(info[key], list) else info[key] or '-'}")
        for key in ("created_at", "base_model", "base_fingerprint", "rank", "target_modules", "config_hash", "source_run"):
            value = m.get(key)
            print(f"  {key:<17} {', '.join(value) if isinstance(value, list) else ('-' if value is None else value)}")
        print(f"  {'metrics':<17} {_metrics(m.get('metrics', {}))}")
        print(table(["  FILE", "BYTES", "SHA256"], [[f"  {rel}", str(f["size"]), f["sha256"][:16]] for rel, f in sorted(m["files"].items())]))
    if info["verified"]:
        print("checksums verified")


def _note(note: dict[str, Any]) -> str:
    """How a promotion or rollback was decided, in one line."""
    if isinstance(note.get("rolled_back"), dict):
        left = ", ".join(f"v{t['version']}={t['weight']:g}" for t in note["rolled_back"].get("targets") or [])
        return f"rolled back from {left} ({note.get('by', '?')})"
    if note.get("gate") == "skipped":
        return f"gate skipped ({note.get('by', '?')})"
    figures = ", ".join(f"v{v['ref'].rsplit('@v', 1)[-1]} " + (
        f"served DPO loss {v['dpo']['served']['loss']:.4f} vs trainer {v['dpo']['trainer']['loss']:.4f}" if v.get("dpo")
        else f"served ppl {v['served_ppl']:.4f} vs trainer {v['trainer_ppl']:.4f}") for v in note.get("verdicts", []))
    return f"gate passed ({note.get('by', '?')}" + (f": {figures})" if figures else ")")


def _promote(registry: Registry, args: argparse.Namespace, registry_config: "RegistryConfig | None") -> None:
    from rayllm.config.gate import GateConfig
    from rayllm.registry import gate

    gate_cfg = registry_config.gate if registry_config is not None else GateConfig()
    if args.endpoint:
        gate_cfg = gate_cfg.model_copy(update={"endpoint": args.endpoint})
    before = registry.get_alias(args.alias_ref)
    alias = gate.promote(registry, args.alias_ref, args.targets, gate_cfg, skip=args.skip_gate, by="registry promote", say=print)
    print(f"{alias.ref} -> {alias.describe()}" + (f" (was {before.describe()})" if before else "")
          + (" [gate skipped]" if args.skip_gate else ""))


def run(args: argparse.Namespace, registry_config: "RegistryConfig | None" = None) -> int:
    """Execute the parsed verb against `--root` or `registry_config.path`; 0 on success, 1 on a registry error."""
    root = args.root or (registry_config.path if registry_config is not None else None)
    if not root:
        print("error: no registry root; pass --root or set registry.path in the config", file=sys.stderr)
        return 1
    try:
        registry = Registry(root)
        verb = args.registry_verb
        if verb == "publish":
            print(registry.publish(args.name, args.adapter_dir, metrics=args.metrics, source_run=args.source_run))
        elif verb == "list":
            _print_list(registry, args.name)
        elif verb == "show":
            _print_show(registry.show(args.ref, verify=args.verify))
        elif verb == "promote":
            _promote(registry, args, registry_config)
        elif verb == "rollback":
            before = registry.get_alias(args.alias_ref)
            alias = registry.rollback(args.alias_ref, by="registry rollback")
            print(f"{alias.ref} -> {alias.describe()} (was {before.describe() if before else '-'})")
        elif verb == "delete":
            registry.delete(args.ref)
            print(f"deleted {args.ref}")
        else:
            raise RegistryError(f"unknown registry verb {verb!r}")
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
