"""`rayllm` command line: one verb per stage, each validating the config before touching Ray.

Only the standard library and pydantic load at import time, so `rayllm --help` and
`rayllm validate` are instant; each verb imports its stage (ray, torch, ...) when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from rayllm.config import ConfigError, RayllmConfig, load_config

# verb -> (section it needs, one-line help)
VERBS: dict[str, tuple[str | None, str]] = {
    "validate": (None, "Check a config file and report every problem at once."),
    "prepare": ("data", "Clean, dedup, split, train a tokenizer, tokenize and pack a corpus on Ray Data."),
    "train": ("train", "Pretrain or fine-tune (full, LoRA, QLoRA) on Ray Train + DeepSpeed."),
    "plan": ("train", "Estimate per-worker memory for the train config and say whether it fits."),
    "sweep": ("tune", "Sweep learning rates with Ray Tune + ASHA; publish the best adapter."),
    "registry": (None, "Publish, list, show, promote, roll back and delete adapter versions."),
    "export": (None, "Turn a training checkpoint into an HF folder, merge a LoRA adapter into its base, or write GGUF for llama.cpp / Ollama."),
    "serve": ("serve", "Serve the base model and its adapters behind an OpenAI-compatible API."),
    "eval": ("eval", "Score models, adapters, registry versions and endpoints side by side: perplexity, generation tasks, lm-eval."),
    "report": (None, "(Re)build report.html, a self-contained page, for a training run, sweep or evaluation folder."),
    "demo": (None, "Run the whole life cycle on a local Ray: pretrain a tiny model, fine-tune and sweep SmolLM2-135M, gate, serve, answer."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayllm", description="A language model from raw text to an HTTP endpoint on Ray.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "registry":
            from rayllm.registry.cli import add_arguments

            p.add_argument("--config", help="Config file whose `registry` section names the registry root.")
            add_arguments(p)
            continue
        if verb == "export":
            kinds = p.add_subparsers(dest="export_kind", metavar="KIND", required=True)
            ck = kinds.add_parser("checkpoint", help="A full-weight checkpoint_* folder (any ZeRO stage) → HF folder (fp32 master weights).")
            ck.add_argument("checkpoint", help="A run's checkpoint_NNNNNNN folder.")
            ck.add_argument("out", help="Output HF folder.")
            mg = kinds.add_parser("merge", help="A LoRA adapter folder folded into its base → HF folder.")
            mg.add_argument("adapter", help="Adapter folder (PEFT + rayllm_adapter.json).")
            mg.add_argument("out", help="Output HF folder.")
            mg.add_argument("--base", default=None, help="Base model folder (default: base_model in rayllm_adapter.json).")
            gg = kinds.add_parser("gguf", help="A model folder, adapter folder or registry ref → one GGUF file (+ Ollama Modelfile).")
            gg.add_argument("src", help="HF model folder, LoRA adapter folder (merged into its base), or registry ref name@vN / name:alias.")
            gg.add_argument("out", help="Output .gguf file; a Modelfile for Ollama is written beside it.")
            gg.add_argument("--type", dest="gguf_type", default="f16", choices=["f16", "q8_0", "q4_0"],
                            help="Weight type of the matrices (norms stay f32). Default f16.")
            gg.add_argument("--registry", default=None, help="Registry root, when SRC is a registry ref.")
            continue
        if verb == "report":
            p.add_argument("path", help="A training run, sweep or evaluation folder.")
            continue
        if verb == "demo":
            p.add_argument("--workdir", default="runs/demo", help="Where the demo writes its corpus, runs and registry.")
            p.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint the serve stage starts.")
            p.add_argument("--stages", default=None, help="Comma list of stages to run (default: all that are available).")
        else:
            p.add_argument("config", help="YAML config file.")
        if verb not in ("validate", "plan"):
            p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")
        if verb == "prepare":
            p.add_argument("--force", action="store_true", help="Rebuild even when the output is up to date.")
        if verb in QUIET_VERBS:
            p.add_argument("--verbose", action="store_true",
                           help="Show Ray's, the workers' and the libraries' output on the console too "
                                "(by default it goes to the log file the command names; the console shows rayllm's lines).")
    return parser


# Verbs whose console shows rayllm's lines and progress only; the rest of their output goes to a log file.
QUIET_VERBS = ("prepare", "train", "sweep", "demo")


def log_path(verb: str, cfg: RayllmConfig | None, args: argparse.Namespace):
    """The log file of a quiet verb: in the folder its results go to."""
    from pathlib import Path

    if verb == "demo":
        from rayllm.demo import log_path as demo_log

        return demo_log(args)
    if verb == "prepare":
        out = Path(cfg.data.output_dir).expanduser().resolve()
        return out.parent / f"{out.name}.prepare.log"  # not inside: the output folder is replaced when complete
    if verb == "train":
        from rayllm.train.run_store import RunStore

        return RunStore(cfg.train.output_dir, cfg.train.run_name).local / "rayllm.log"
    return Path(cfg.tune.output_dir).expanduser().resolve() / cfg.tune.name / "rayllm.log"


def _quietly(verb: str, cfg: RayllmConfig | None, args: argparse.Namespace, body) -> int:
    from rayllm import console

    with console.session(log_path(verb, cfg, args), verbose=args.verbose, title=" ".join(sys.argv[1:])):
        return body()


def _require(cfg: RayllmConfig, section: str | None, source: str) -> None:
    if section and getattr(cfg, section) is None:
        raise ConfigError(source, [f"{section}: section required for this verb; see README 'Configuration reference'"])


def _run_verb(verb: str, cfg: RayllmConfig, args: argparse.Namespace) -> int:
    """Run a verb's stage; the stage module (and ray, torch, ...) is imported only now."""
    if verb == "prepare":
        from rayllm.data.prepare import run

        run(cfg.data, address=args.address, force=args.force)
        return 0
    if verb == "train":
        from rayllm.train.launch import run

        run(cfg, address=args.address)
        return 0
    if verb == "plan":
        from rayllm.train.launch import plan_main

        return plan_main(cfg)
    if verb == "sweep":
        from rayllm.tune.sweep import run

        run(cfg, address=args.address)
        return 0
    if verb == "serve":
        from rayllm.serve.deploy import run

        return run(cfg, address=args.address)
    if verb == "eval":
        from rayllm.eval.run import run
        from rayllm.eval.targets import EvalError

        try:
            run(cfg, address=args.address, source=args.config)
        except EvalError as exc:
            print(f"rayllm: eval: {exc}", file=sys.stderr)
            return 2
        return 0
    raise SystemExit(f"rayllm: unknown verb {verb}")


def _export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rayllm.train import export

    def refuse(message: str) -> int:
        print(f"rayllm: export {args.export_kind}: {message}", file=sys.stderr)
        return 2

    if args.export_kind == "gguf":
        from rayllm.gguf_export import GGUFExportError, export_source
        from rayllm.registry import RegistryError

        try:
            print(f"rayllm: wrote {export_source(args.src, args.out, args.gguf_type, args.registry)} and a Modelfile beside it")
        except (GGUFExportError, RegistryError) as exc:
            return refuse(str(exc))
        return 0
    if args.export_kind == "checkpoint":
        if not (Path(args.checkpoint) / "hf" / "config.json").is_file():
            return refuse(f"{args.checkpoint} is not a rayllm checkpoint folder (no hf/config.json); "
                          "give a run's checkpoint_NNNNNNN folder")
        print(f"rayllm: wrote {export.checkpoint_to_hf(args.checkpoint, args.out)}")
        return 0
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        return refuse(f"{args.adapter} is not a PEFT adapter folder (no adapter_config.json)")
    base = args.base
    meta = Path(args.adapter) / export.ADAPTER_META
    if base is None and meta.is_file():
        base = json.loads(meta.read_text()).get("base_model")
    if not base:
        return refuse("the adapter names no base_model; pass --base BASE_FOLDER")
    if not (Path(base) / "config.json").is_file():
        return refuse(f"base {base} is not an HF model folder (no config.json); pass --base BASE_FOLDER")
    print(f"rayllm: wrote {export.merge_lora(base, args.adapter, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "address", None) is None and os.environ.get("RAY_ADDRESS"):
        args.address = os.environ["RAY_ADDRESS"]
    try:
        if args.verb == "demo":
            from rayllm.demo import main as demo_main

            return _quietly("demo", None, args, lambda: demo_main(args))
        if args.verb == "export":
            return _export(args)
        if args.verb == "report":
            from rayllm.report import ReportError, build

            try:
                print(f"rayllm: wrote {build(args.path)}")
            except ReportError as exc:
                print(f"rayllm: report: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.verb == "registry":
            from rayllm.registry.cli import run

            cfg = load_config(args.config) if args.config else RayllmConfig()
            return run(args, cfg.registry)
        cfg = load_config(args.config)
        _require(cfg, VERBS[args.verb][0], args.config)
        if args.verb == "validate":
            sections = [name for name in RayllmConfig.model_fields if getattr(cfg, name) is not None]
            print(f"{args.config}: ok (sections: {', '.join(sections)})")
            return 0
        if args.verb in QUIET_VERBS:
            return _quietly(args.verb, cfg, args, lambda: _run_verb(args.verb, cfg, args))
        return _run_verb(args.verb, cfg, args)
    except ConfigError as exc:
        print(f"rayllm: invalid config {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or a sweep cut off mid-way: rerunning the same command resumes
        print(f"rayllm: {args.verb} interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
