"""The promotion gate: before an alias moves to a version, measure that version through the live endpoint.

The candidate `name@vN` is asked for by its exact version (serving routes it to that registry
version and names it in the answer), over the val sequences its trainer evaluated, with token-id
prompts as lm-eval sends them (rayllm.eval.served). Its validation perplexity must equal the
trainer's own figure in the version's manifest within `registry.gate.tolerance` (relative). When
it does not, the weights that answer are not the weights that were judged in training — a wrong
tokenizer or chat template behind the data, an adapter config not the one trained, an adapter
for another base, a LoRA kernel bug in the serving engine — and the alias stays where it was.

A DPO version (a preference dataset, `train.objective: dpo`) has a DPO loss for its val_loss, so it is
measured the DPO way instead: the same loss and rewards from the candidate's and the base's served
log-probabilities of each val pair's chosen and rejected response (registry/gate_dpo.py).

Every decision is stored beside what it judged: the figures go into the version's manifest
(section `gate`, keyed by alias) and, for a promotion that happened, into the alias file with the
targets they explain (the note moves into the alias history on the next promote). Skipping the
gate is a flag that is recorded the same way.

The gate calls the registry, never the reverse (the store knows nothing about endpoints).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from rayllm.registry.names import AdapterRef, RegistryError
from rayllm.registry.resolve import Alias, TargetSpec, parse_targets
from rayllm.registry.store import Registry, RefLike

if TYPE_CHECKING:
    from rayllm.config.gate import GateConfig

SECTION = "gate"  # the manifest section the gate writes (Registry.record)
NO_ENDPOINT = ("registry.gate.endpoint is empty, so the version cannot be measured before the alias moves; "
               "set registry.gate.endpoint to the endpoint serving this registry, or skip the gate explicitly "
               "(`rayllm registry promote ... --skip-gate`, tune.promote_skip_gate: true)")


class GateRefused(RegistryError):
    """The gate measured a version and refused it; `verdict` holds both figures."""

    def __init__(self, verdict: "Verdict"):
        self.verdict = verdict
        super().__init__(verdict.message())


@dataclass(frozen=True)
class Scope:
    """What the trainer's figure covers: the first `sequences` val rows of `dataset`, with or without document masking."""

    dataset: str
    sequences: int | None
    document_masking: bool
    source: str  # where these came from, for the record
    objective: str = "lm"  # "dpo": a preference dataset, measured by gate_dpo
    dpo: dict[str, Any] = field(default_factory=dict)  # the run's train.dpo (beta, loss_type, label_smoothing)


@dataclass
class Verdict:
    ref: str
    passed: bool
    trainer_ppl: float | None
    served_ppl: float | None
    rel_diff: float | None
    tolerance: float
    endpoint: str
    tokens: int = 0
    sequences: int = 0
    cause: str = ""
    generation: dict[str, Any] | None = None  # {task, metric, candidate, current, current_ref, margin} when compared
    dpo: dict[str, Any] | None = None  # a DPO version: {trainer, served, abs_diff, reference_model, settings}
    measured_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def message(self) -> str:
        """One line: the decision, both figures, and (on refusal) the likely cause."""
        if self.dpo is not None:
            d, trainer = self.dpo, self.dpo["trainer"]
            served = d.get("served") or {}
            figures = (f"served val DPO loss {_fmt(served.get('loss'))} vs trainer's {_fmt(trainer.get('loss'))}"
                       + (f" ({d['abs_diff']:.4f} apart, tolerance {self.tolerance:g})" if d.get("abs_diff") is not None else "")
                       + (f", preference accuracy {served['rewards/accuracies']:.2f} vs {trainer['rewards/accuracies']:.2f}"
                          if "rewards/accuracies" in served and "rewards/accuracies" in trainer else ""))
        else:
            figures = (f"served val ppl {_fmt(self.served_ppl)} vs trainer's {_fmt(self.trainer_ppl)}"
                       + (f" ({100 * self.rel_diff:.2f}% apart, tolerance {100 * self.tolerance:g}%)" if self.rel_diff is not None else ""))
        g = self.generation
        if g:
            figures += (f"; {g['task']}/{g['metric']} {g['candidate']:.2f} vs {g['current_ref']}'s {g['current']:.2f} "
                        f"(margin {g['margin']:g})")
        if self.passed:
            what = "val pairs" if self.dpo is not None else "val sequences"
            return f"gate passed for {self.ref}: {figures}, {self.tokens} tokens of {self.sequences} {what} at {self.endpoint}"
        return f"gate refused {self.ref}: {figures}; likely cause: {self.cause}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


# -- decision logic (pure) ----------------------------------------------------------------------
def trainer_ppl(manifest: dict[str, Any], ref: str) -> float:
    """The trainer's validation perplexity of these weights: metrics.val_ppl, else exp(metrics.val_loss)."""
    metrics = manifest.get("metrics") or {}
    for key, f in (("val_ppl", float), ("val_loss", lambda v: math.exp(min(float(v), 50.0)))):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return f(value)
    raise RegistryError(f"{ref} has no finite val_loss or val_ppl in its manifest's metrics, so the gate has nothing to "
                        "compare with; publish the adapter folder training wrote (its rayllm_adapter.json holds them) "
                        "or pass --metrics '{\"val_loss\": ...}'")


def likely_cause(trainer: float, served: float) -> str:
    """Words for a mismatch, from its direction and size."""
    if served > trainer:
        return ("the served weights do not compute what training computed: an adapter_config.json (alpha, rank, target "
                "modules) other than the one trained, an adapter for another base, data tokenized with another "
                "tokenizer or rendered with another chat template than the served model's, or a LoRA kernel bug "
                "in the serving engine")
    return ("the endpoint scores better than training did: the trainer's figure belongs to other weights (a metrics "
            "entry copied from another run) or the data differs from the trainer's val split (another tokenizer "
            "or chat template)")


def judge(ref: str, trainer: float, served: dict[str, Any], tolerance: float, endpoint: str) -> Verdict:
    """Pass when |served - trainer| / trainer <= tolerance."""
    rel = abs(served["ppl"] - trainer) / trainer
    passed = rel <= tolerance
    return Verdict(ref, passed, trainer, served["ppl"], rel, tolerance, endpoint, int(served["tokens"]),
                   int(served["sequences"]), "" if passed else likely_cause(trainer, served["ppl"]))


def judge_dpo(ref: str, trainer: dict[str, float], served: dict[str, Any], tolerance: float, endpoint: str,
              reference_model: str, settings: dict[str, Any]) -> Verdict:
    """Pass when |served val DPO loss - trainer's val_loss| <= tolerance (nats per pair)."""
    from rayllm.registry import gate_dpo

    diff = abs(served["loss"] - trainer["loss"])
    passed = diff <= tolerance
    figures = {k: served[k] for k in gate_dpo.FIGURES}
    return Verdict(ref, passed, None, None, None, tolerance, endpoint, int(served["tokens"]), int(served["pairs"]),
                   "" if passed else gate_dpo.cause(reference_model),
                   dpo={"trainer": trainer, "served": figures, "abs_diff": diff, "reference_model": reference_model,
                        "settings": settings})


def endpoint_cause(message: str) -> str:
    """Words for a measurement that failed, from the endpoint's own error."""
    if "fingerprint" in message:
        return "an adapter for another base (the server refused it)"
    if "does not exist" in message or "HTTP 404" in message:
        return "the endpoint does not serve this registry (its registry root differs from this one)"
    return "the endpoint could not be measured"


def judge_generation(verdict: Verdict, task: str, metric: str, candidate: float, current: float, current_ref: str,
                     margin: float) -> Verdict:
    """The verdict with the generation comparison added: refused when the candidate scores more than `margin`
    below the alias's current version (higher is better for every generation metric)."""
    verdict.generation = {"task": task, "metric": metric, "candidate": candidate, "current": current,
                          "current_ref": current_ref, "margin": margin}
    if verdict.passed and candidate < current - margin:
        verdict.passed = False
        verdict.cause = (f"it generates worse than {current_ref} on {task} ({metric} {candidate:.2f} < {current:.2f} - "
                         f"{margin:g}): the perplexity matches training, so the training itself (data, steps, learning "
                         "rate) made it worse at this task")
    return verdict


# -- what the trainer's figure covers -------------------------------------------------------------
def _run_config(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The config.yaml of the run that produced the version, when source_run is a readable run folder."""
    import yaml

    from rayllm.storage import url_to_fs

    run = manifest.get("source_run")
    if not isinstance(run, str) or not run:
        return None
    try:
        fs, path = url_to_fs(run)
        with fs.open(f"{path.rstrip('/')}/config.yaml", "r") as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def trainer_sequences(train: dict[str, Any], dataset: str) -> int | None:
    """Val rows `loop.evaluate` covers for this train section: eval micro-batches × micro batch × workers."""
    from rayllm.train.batching import Batching, eval_micro_batches
    from rayllm.train.data import read_manifest

    try:
        manifest = read_manifest(dataset)
    except (OSError, ValueError):
        return None
    micro, workers = int(train.get("micro_batch_size", 4)), int(train.get("num_workers", 2))
    b = Batching(micro, int(train.get("gradient_accumulation_steps", 1)), workers, int(manifest["seq_len"]))
    n = eval_micro_batches(b, int(train.get("eval_batches", 8)), int(manifest["splits"]["val"]["sequences"]))
    return n * micro * workers


def scope_for(manifest: dict[str, Any], gate: "GateConfig", train: dict[str, Any] | None, ref: str) -> Scope:
    """The dataset, row count and masking of the trainer's figure: the version's own run first (its
    config.yaml), then the caller's train section; `registry.gate` overrides dataset and caps rows."""
    run = _run_config(manifest)
    found = (run or {}).get("train") or {}
    source = "run config" if found else "this config's train section"
    train_section = found or train or {}
    dataset = gate.dataset or train_section.get("dataset")
    if not dataset:
        raise RegistryError(f"{ref}: no dataset to measure on: set registry.gate.dataset to the prepared dataset the "
                            "version was trained on (its run's config.yaml was not found)")
    mode = _dataset_mode(str(dataset))
    objective = "dpo" if mode == "preference" or train_section.get("objective") == "dpo" else "lm"
    if objective == "dpo" and mode not in (None, "preference"):
        raise RegistryError(f"{ref} was trained with train.objective dpo, but {dataset} is a {mode!r} dataset; set "
                            "registry.gate.dataset to the preference dataset it was trained on")
    recorded = (manifest.get("metrics") or {}).get("val_sequences")
    sequences = int(recorded) if isinstance(recorded, int) else trainer_sequences(train_section, dataset)
    if gate.max_sequences is not None:
        sequences = gate.max_sequences if sequences is None else min(sequences, gate.max_sequences)
    return Scope(str(dataset), sequences, bool(train_section.get("document_masking", True)), source, objective,
                 dict(train_section.get("dpo") or {}) if objective == "dpo" else {})


def _dataset_mode(dataset: str) -> str | None:
    """The prepared dataset's data.mode (None when its manifest cannot be read here)."""
    from rayllm.train.data import read_manifest

    try:
        return read_manifest(dataset).get("mode")
    except (OSError, ValueError):
        return None


# -- measuring and promoting --------------------------------------------------------------------
Measure = Callable[["GateConfig", str, Scope], dict[str, Any]]
MeasureGeneration = Callable[["GateConfig", str], float]


def measure_served(gate: "GateConfig", model: str, scope: Scope) -> dict[str, Any]:
    """The real measurement: rayllm.eval.served against registry.gate.endpoint."""
    from rayllm.eval.served import api_key_from_env, served_perplexity

    return served_perplexity(gate.endpoint, model, scope.dataset, sequences=scope.sequences,
                             document_masking=scope.document_masking, api_key=api_key_from_env(gate.api_key_env),
                             timeout_s=gate.timeout_s, concurrency=gate.concurrency)


def measure_generation_served(gate: "GateConfig", model: str) -> float:
    """registry.gate.generation's metric for `model`, generated greedily through the endpoint with the eval
    stage's own request and scoring code (rayllm.eval.endpoint, rayllm.eval.tasks)."""
    from rayllm.config.eval import EndpointConfig
    from rayllm.eval import endpoint, tasks

    g = gate.generation
    rows = tasks.read_rows(g.path, g.max_rows).rows
    if not rows:
        raise RegistryError(f"registry.gate.generation: {g.path} has no valid rows")
    requests = []
    for row in rows:
        messages = tasks.messages_of(row, g.chat)
        requests.append({**({"messages": messages} if messages else {"prompt": row.prompt}), "max_tokens": g.max_new_tokens})
    target = EndpointConfig(url=gate.endpoint, model=model, api_key_env=gate.api_key_env or None)
    got = endpoint.generate(target, requests, concurrency=gate.concurrency, connect_timeout_s=min(gate.timeout_s, 10.0),
                            request_timeout_s=gate.timeout_s, where=f"gate generation {model}")
    failed = [a["error"] for a in got if "error" in a]
    if failed:
        raise RegistryError(f"gate: {len(failed)} of {len(got)} generation requests for {model} failed; first: {failed[0]}")
    outputs = [a["text"] for a in got]
    return tasks.score([gate.generation_metric], outputs, [r.references for r in rows])[gate.generation_metric]


def measure_served_dpo(gate: "GateConfig", model: str, scope: Scope) -> dict[str, Any]:
    """The real DPO measurement: registry/gate_dpo.py against registry.gate.endpoint."""
    from rayllm.registry.gate_dpo import measure_served_dpo as measure

    return measure(gate, model, scope)


def check(registry: Registry, ref: RefLike, gate: "GateConfig", alias: str, *, train: dict[str, Any] | None = None,
          measure: Measure = measure_served, current_ref: str | None = None,
          measure_generation: MeasureGeneration = measure_generation_served,
          measure_dpo: Measure = measure_served_dpo) -> Verdict:
    """Measure one version through the endpoint and judge it; the verdict is recorded in its manifest.
    With registry.gate.generation and a `current_ref` (the alias's version now), both generate too.
    A DPO version is measured by `measure_dpo` and judged on its DPO loss."""
    from rayllm.eval.served import EndpointError
    from rayllm.registry import gate_dpo

    r = AdapterRef.parse(ref)
    if r.version is None:
        raise RegistryError(f"the gate measures one version, {r.name}@vN, not {str(r)!r}")
    if not gate.endpoint:
        raise RegistryError(NO_ENDPOINT)
    manifest = registry.resolve(r, verify=False).manifest
    scope = scope_for(manifest, gate, train, str(r))
    dpo = scope.objective == "dpo"
    expected = gate_dpo.trainer_figures(manifest, str(r)) if dpo else trainer_ppl(manifest, str(r))
    try:
        served = (measure_dpo if dpo else measure)(gate, str(r), scope)
    except EndpointError as e:
        if e.status is None or e.status == 401:  # the endpoint, not the version, is the problem: nothing to record
            raise RegistryError(f"gate: {e}") from None
        verdict = Verdict(str(r), False, None if dpo else expected, None, None, gate.tolerance, gate.endpoint,
                          cause=f"{endpoint_cause(str(e))} ({e})",
                          dpo={"trainer": expected, "served": None, "abs_diff": None, "reference_model": gate.reference_model,
                               "settings": scope.dpo} if dpo else None)
    else:
        verdict = (judge_dpo(str(r), expected, served, gate.tolerance, gate.endpoint, gate.reference_model, scope.dpo) if dpo
                   else judge(str(r), expected, served, gate.tolerance, gate.endpoint))
        if verdict.passed and gate.generation is not None and current_ref is not None:
            verdict = judge_generation(verdict, gate.generation.name, gate.generation_metric, measure_generation(gate, str(r)),
                                       measure_generation(gate, current_ref), current_ref, gate.generation_margin)
    registry.record(r, SECTION, alias, {**verdict.to_json(), "dataset": scope.dataset, "document_masking": scope.document_masking})
    return verdict


def promote(registry: Registry, alias_ref: RefLike, targets: TargetSpec, gate: "GateConfig", *, skip: bool = False,
            by: str = "registry promote", train: dict[str, Any] | None = None, measure: Measure = measure_served,
            measure_generation: MeasureGeneration = measure_generation_served, say: Callable[[str], None] | None = None,
            measure_dpo: Measure = measure_served_dpo) -> Alias:
    """Move `name:alias` to `targets` once every version new to it has passed the gate (or `skip` says not to
    measure). Raises GateRefused, alias untouched, on the first version refused. `say` gets each verdict's line."""
    a = AdapterRef.parse_alias(alias_ref)
    new = parse_targets(targets)
    current = registry.get_alias(a)
    serving = {t.version for t in current.targets} if current else set()
    # what a candidate's generation is compared with: the version taking most of the alias's traffic now
    main = max(current.targets, key=lambda t: t.weight).version if current else None
    current_ref = str(AdapterRef.of_version(a.name, main)) if main is not None else None
    note: dict[str, Any] = {"by": by, "gate": "skipped" if skip else "passed"}
    if not skip:
        verdicts = []
        for t in new:
            if t.version in serving:  # already took this alias's traffic: judged when it first did
                continue
            verdict = check(registry, AdapterRef.of_version(a.name, t.version), gate, str(a), train=train, measure=measure,
                            current_ref=current_ref, measure_generation=measure_generation, measure_dpo=measure_dpo)
            if not verdict.passed:
                raise GateRefused(verdict)
            if say:
                say(verdict.message())
            verdicts.append(verdict.to_json())
        note["verdicts"] = verdicts
    return registry.promote(a, targets, note=note)


def gate_problems(promote_alias: str | None, gate: "GateConfig", skip: bool) -> list[str]:
    """Config errors of an auto-promotion: promoting needs an endpoint to measure on, or an explicit skip."""
    if promote_alias and not gate.endpoint and not skip:
        return [f"tune.promote_alias ({promote_alias}): {NO_ENDPOINT}"]
    return []

