"""What the promotion gate measures for a DPO version (`train.objective: dpo`).

A DPO run's `val_loss` is the DPO loss over val pairs, not a next-token loss, so the perplexity
comparison does not apply. The like-for-like figure is the same DPO loss computed from the endpoint:
for each of the val pairs the trainer evaluated, the summed log-probabilities of the chosen and the
rejected response under the candidate (`name@vN`) and under the reference — for a LoRA adapter the
base with the adapter disabled, which is the base model the endpoint serves
(`registry.gate.reference_model`) — through the same token-id, echo + logprobs requests the
perplexity gate sends (rayllm.eval.served). The loss and reward figures then come from the
trainer's own function (rayllm.train.dpo.dpo_loss) with the run's beta, loss_type and
label_smoothing, so a served version passes when its served val DPO loss is within
`registry.gate.tolerance` (absolute, nats per pair) of the trainer's.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from rayllm.registry.names import RegistryError

if TYPE_CHECKING:
    from rayllm.config.gate import GateConfig
    from rayllm.eval.served import Segment
    from rayllm.registry.gate import Scope

IGNORE = -100  # the trainer's ignore index
FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def pair_segments(input_ids: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray) -> list[tuple["Segment", "Segment"]]:
    """(chosen, rejected) prompts of each prepared pair row: document 0 is prompt + chosen, document 1
    prompt + rejected (data/preference.py); the targets are the trainer's (`dpo.sequence_logps`): labelled
    positions t >= 1 of each sequence on its own."""
    from rayllm.eval.served import Segment

    out = []
    for r in range(input_ids.shape[0]):
        pair = []
        for doc, side in ((0, "chosen"), (1, "rejected")):
            keep = doc_ids[r] == doc
            ids, lab = input_ids[r][keep], labels[r][keep]
            targets = [t for t in range(1, len(ids)) if lab[t] != IGNORE]
            if not targets:
                raise ValueError(f"val pair {r}: the {side} response has no labelled tokens; is this a preference dataset?")
            if any(lab[t] != ids[t] for t in targets):
                raise ValueError(f"val pair {r}: a {side} label differs from its input token")
            pair.append(Segment(r, ids.astype(int).tolist(), targets))
        out.append((pair[0], pair[1]))
    return out


def dpo_figures(policy: np.ndarray, reference: np.ndarray, tokens: np.ndarray, settings: dict[str, Any]) -> dict[str, float]:
    """Mean loss and rewards over pairs from [pairs, 2] (chosen, rejected) summed log-probs, as `Dpo.evaluate` logs them."""
    import torch

    from rayllm.train.dpo import dpo_loss

    p, r, n = (torch.as_tensor(a, dtype=torch.float64) for a in (policy, reference, tokens))
    losses, chosen, rejected = dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], float(settings.get("beta", 0.1)),
                                        str(settings.get("loss_type", "sigmoid")), float(settings.get("label_smoothing", 0.0)),
                                        n[:, 0], n[:, 1])
    margin = chosen - rejected
    return {"loss": losses.mean().item(), "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": margin.mean().item(), "rewards/accuracies": (margin > 0).double().mean().item()}


def measure_served_dpo(gate: "GateConfig", model: str, scope: "Scope") -> dict[str, Any]:
    """The served val DPO figures of `model` (reference: registry.gate.reference_model) over the pairs the trainer evaluated."""
    import httpx

    from rayllm.eval.served import api_key_from_env, load_val, score_segment

    pairs = pair_segments(*load_val(scope.dataset, scope.sequences))
    if not pairs:
        raise ValueError(f"{scope.dataset}: the val split has no pairs")
    root = gate.endpoint.rstrip("/")
    url = f"{root}/completions" if root.endswith("/v1") else f"{root}/v1/completions"
    api_key = api_key_from_env(gate.api_key_env)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    jobs = [(name, seg) for name in (model, gate.reference_model) for pair in pairs for seg in pair]
    with httpx.Client(timeout=httpx.Timeout(gate.timeout_s, connect=min(gate.timeout_s, 10.0)), headers=headers) as client:
        first = score_segment(client, url, model, jobs[0][1])  # fails fast (refused key, unknown model) before fanning out
        pool = ThreadPoolExecutor(max_workers=max(1, gate.concurrency))
        try:
            rest = list(pool.map(lambda job: score_segment(client, url, *job), jobs[1:]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    nll = np.array([first[0]] + [s[0] for s in rest]).reshape(2, len(pairs), 2)
    counts = np.array([first[1]] + [s[1] for s in rest]).reshape(2, len(pairs), 2)
    figures = dpo_figures(-nll[0], -nll[1], counts[0], scope.dpo)
    return {**figures, "pairs": len(pairs), "tokens": int(counts[0].sum())}


def trainer_figures(manifest: dict[str, Any], ref: str) -> dict[str, float]:
    """The trainer's val DPO figures from the version's manifest (val_loss required)."""
    metrics = manifest.get("metrics") or {}
    out = {}
    for name in FIGURES:
        value = metrics.get(f"val_{name}")
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    if "loss" not in out:
        raise RegistryError(f"{ref} is a DPO version without a finite val_loss in its manifest's metrics, so the gate has "
                            "nothing to compare with; publish the adapter folder training wrote (its rayllm_adapter.json "
                            "holds the val figures)")
    return out


def cause(reference_model: str) -> str:
    """Words for a DPO mismatch."""
    return (f"the served log-probabilities do not give the trainer's DPO loss: {reference_model!r} is not the base the adapter "
            "was trained from (registry.gate.reference_model), an adapter_config.json other than the one trained, a beta, "
            "loss_type or label_smoothing other than the run's (its config.yaml), another tokenizer or chat template than "
            "the data's, or a LoRA kernel bug in the serving engine")
