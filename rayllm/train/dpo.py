"""Direct preference optimisation (`train.objective: dpo`) on the same step loop as every objective.

What differs from next-token training is what a batch holds and the loss function, as for seq2seq:
  * `PreferenceSplit` reads a prepared preference dataset (one pair per row: prompt + chosen is
    document 0, prompt + rejected document 1, data/preference.py) and hands the loop TRL's batch
    layout: [chosen sequences; rejected sequences], right-padded, labels on the responses only.
  * `Dpo` is the loop's `loss_fn`: summed log-probs of each response under the policy and the
    reference, then the sigmoid (with cDPO label smoothing) or IPO loss, summed over the pairs; a
    pair is the unit the loop averages over (`target_tokens` counts pairs). It keeps the reward
    statistics that the loop logs (train) and computes (val).
  * The reference is the base with the adapter disabled under LoRA (no second copy of anything),
    and a frozen copy of the starting weights for a full fine-tune (sharded like the policy under
    ZeRO-3). `precompute_reference` runs it once over both splits before step 1, so the steps do no
    reference forward, and a full fine-tune drops its copy before the optimizer states exist.

The formulas are TRL's (`DPOTrainer`, trl 1.16; tests/unit/test_dpo.py checks the figures against
it). It is not used directly because it is a `transformers.Trainer`: it would replace this loop,
and with it the ZeRO checkpoints, exact resume and spike rollback every objective shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rayllm.train.data import IGNORE, PackedSplit

if TYPE_CHECKING:
    from rayllm.config.train import DpoConfig
    from rayllm.train.spec import RunSpec

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def split_row(ids: np.ndarray, labels: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chosen ids, chosen labels, rejected ids, rejected labels) of one prepared pair row."""
    c, r = docs == 0, docs == 1
    return ids[c], labels[c], ids[r], labels[r]


@dataclass
class PreferenceSplit:
    """A prepared preference split as DPO batches; same interface as PackedSplit for the loop (rows,
    one pair each, are the unit of order and data position)."""

    rows: PackedSplit
    pad_id: int
    ref_logps: np.ndarray | None = None  # [rows, 2] reference (chosen, rejected) log-probs, once precomputed

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices, document_masking: bool = True) -> dict:
        """input_ids, attention_mask and labels of [chosen...; rejected...], right-padded to the longest
        sequence of the batch (`document_masking` is moot: each sequence is its own example)."""
        import torch

        r = self.rows
        indices = np.atleast_1d(indices)
        parts = [split_row(r.input_ids[i], r.labels[i], r.doc_ids[i]) for i in indices]
        seqs = [(p[0], p[1]) for p in parts] + [(p[2], p[3]) for p in parts]
        width = max(len(s) for s, _ in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(seqs), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for k, (s, lab) in enumerate(seqs):
            ids[k, :len(s)], labels[k, :len(s)], mask[k, :len(s)] = s, lab, 1
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels)}
        if self.ref_logps is not None:
            ref = torch.from_numpy(self.ref_logps[indices])
            out["ref_chosen_logps"], out["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return out

    def target_tokens(self, indices, document_masking: bool = True) -> int:
        """The pairs: the loop divides the summed loss by them, so a step's loss is the mean over its pairs."""
        return len(np.atleast_1d(indices))


def sequence_logps(logits, labels):
    """(summed log-prob of each sequence's labelled tokens, how many there are), fp32; causal shift here."""
    import torch.nn.functional as F

    labels = labels[:, 1:]
    per_token = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                 reduction="none").view(labels.shape)
    return per_token.sum(-1), (labels != IGNORE).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """(per-pair loss, chosen rewards, rejected rewards) from summed response log-probs.

    sigmoid: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ), Δ the difference of the policy/reference log-ratios
    (ε = label_smoothing: conservative DPO; 0 is DPO). ipo: (Δ' - 1/(2β))², Δ' from the log-ratios
    divided by each response's token count (TRL's IPO). Rewards: β × log-ratio, no gradient."""
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        delta = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass
class Stats:
    """Sums over pairs since the last `take`: loss and the reward figures (TRL's names)."""

    sums: np.ndarray = field(default_factory=lambda: np.zeros(6))  # pairs, loss, chosen, rejected, margin, correct

    def add(self, losses, chosen, rejected) -> None:
        margin = chosen - rejected
        self.sums += [len(losses), losses.detach().sum().item(), chosen.sum().item(), rejected.sum().item(),
                      margin.sum().item(), (margin > 0).sum().item()]

    def take(self, device, prefix: str = "") -> dict[str, float]:
        """Means over every rank's pairs (collective), then reset."""
        from rayllm.train.loop import all_sum

        n, loss, *rest = all_sum(list(self.sums), device)
        self.sums = np.zeros(6)
        out = {f"{prefix}{k}": v / max(n, 1) for k, v in zip(METRICS, rest)}
        return {f"{prefix}loss": loss / max(n, 1), **out} if prefix else out


class Dpo:
    """The loop's loss function for DPO, its reference model and its metrics."""

    def __init__(self, cfg: DpoConfig, lora: bool, reference=None):
        self.cfg, self.lora = cfg, lora
        self.reference = reference  # full fine-tune: the frozen copy (None under LoRA, or once precomputed)
        self.train_stats = Stats()
        self.last_train: dict[str, float] = {}

    @property
    def spike_floor(self) -> float:
        """The loss where the policy equals its reference (ln 2; IPO: (1/2β)²): the spike test's least
        median, since a DPO loss heads for 0 and its noise there is no divergence."""
        return (1 / (2 * self.cfg.beta)) ** 2 if self.cfg.loss_type == "ipo" else math.log(2)

    def reference_logps(self, engine, batch: dict):
        """Summed response log-probs of the reference: precomputed, the adapter-disabled base, or the copy."""
        import torch

        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
        with torch.no_grad():
            if self.lora:
                with engine.module.disable_adapter():
                    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                logits = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return sequence_logps(logits, batch["labels"])[0]

    def terms(self, engine, batch: dict, device):
        """(per-pair losses, chosen rewards, rejected rewards) of one micro-batch."""
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, tokens = sequence_logps(logits, batch["labels"])
        ref = self.reference_logps(engine, batch)
        (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), tokens.chunk(2)
        c = self.cfg
        return dpo_loss(pc, pr, rc, rr, c.beta, c.loss_type, c.label_smoothing, nc, nr)

    def __call__(self, engine, batch: dict, device):
        """loop.train_step's loss_fn: the micro-batch's summed DPO loss."""
        losses, chosen, rejected = self.terms(engine, batch, device)
        self.train_stats.add(losses, chosen, rejected)
        return losses.sum()

    def step_metrics(self, device) -> dict[str, float]:
        """The train reward figures since the last logged step (collective)."""
        self.last_train = self.train_stats.take(device)
        return self.last_train

    def evaluate(self, engine, val: PreferenceSplit, n_micro: int, micro: int, rank: int, world: int, device) -> dict[str, float]:
        """val_loss and val_rewards/* over the first n_micro × micro × world val pairs (collective)."""
        import torch

        stats = Stats()
        engine.eval()
        with torch.no_grad():
            for m in range(n_micro):
                rows = np.arange((m * world + rank) * micro, (m * world + rank + 1) * micro)
                stats.add(*self.terms(engine, val.batch(rows), device))
        engine.train()
        return stats.take(device, prefix="val_")

    def precompute(self, engine, splits: list[PreferenceSplit], micro: int, rank: int, world: int, device) -> None:
        """Reference log-probs of every pair of `splits`, computed once and shared by all ranks; then the
        full fine-tune's reference copy is dropped."""
        import torch

        from rayllm.train.loop import all_sum

        engine.eval()
        for split in splits:
            n = len(split)
            out = np.zeros((n, 2))
            # Every rank runs the same number of forwards: under ZeRO-3 each forward is a collective.
            for start in range(0, n, micro * world):
                rows = np.arange(start + rank * micro, min(start + (rank + 1) * micro, n))
                batch = {k: v.to(device) for k, v in split.batch(rows if len(rows) else np.arange(1)).items()}
                ref = self.reference_logps(engine, batch).view(2, -1).T.double().cpu().numpy()
                if len(rows):
                    out[rows] = ref
            split.ref_logps = np.asarray(all_sum(out.reshape(-1).tolist(), device)).reshape(n, 2)
        engine.train()
        self.reference = None


def reference_copy(spec: RunSpec, tokenizer, dtype: str, device):
    """A full fine-tune's reference: the starting weights again, frozen. Under ZeRO-3 it is sharded by
    its own DeepSpeed engine (no optimizer), as TRL prepares its reference model. Returns (model or
    engine, HfDeepSpeedConfig or None; the caller keeps the latter alive)."""
    from rayllm.train.worker import make_model
    from rayllm.train.zero import deepspeed_config

    t = spec.train
    ds_config = deepspeed_config(t, spec.batching, dtype, spec.planned_trainable_params)
    model, hf_ds = make_model(spec.model, t, tokenizer, spec.base_dir, dtype, ds_config, device)
    model.requires_grad_(False)
    if t.zero_stage == 3:
        import deepspeed

        ref_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        model = deepspeed.initialize(model=model, config=ref_config)[0]
    else:
        model = model.to(device)
    model.eval()
    return model, hf_ds


def setup(spec: RunSpec, engine, train: PackedSplit, val: PackedSplit, tokenizer, dtype: str, device, rank: int,
          world: int, eval_micro_batches: int) -> tuple[Dpo, PreferenceSplit, PreferenceSplit, Any]:
    """(objective, train split, val split, what must stay alive) of a DPO run."""
    t, lora = spec.train, spec.model.lora is not None
    train_split, val_split = PreferenceSplit(train, tokenizer.pad_token_id), PreferenceSplit(val, tokenizer.pad_token_id)
    reference, keep = (None, None) if lora else reference_copy(spec, tokenizer, dtype, device)
    objective = Dpo(t.dpo, lora, reference)
    if t.dpo.precompute_reference:
        micro = spec.batching.micro_batch_size
        val_pairs = min(len(val_split), eval_micro_batches * micro * world)
        val_split.rows = PackedSplit(*(a[:val_pairs] for a in (val.input_ids, val.labels, val.doc_ids)))
        objective.precompute(engine, [train_split, val_split], micro, rank, world, device)
        keep = None
    return objective, train_split, val_split, keep


def preflight_problems(cfg, manifest: dict, hf_config: dict | None) -> list[str]:
    """Objective and dataset must match: a preference dataset trains with DPO only, and DPO needs one."""
    from rayllm.model import is_seq2seq

    mode, objective = manifest.get("mode"), cfg.train.objective
    if objective == "dpo" and mode != "preference":
        return [f"train.objective: dpo needs a preference dataset, but {cfg.train.dataset} was prepared with data.mode "
                f"{mode!r}; prepare one with data.mode: preference, or set train.objective: lm"]
    if objective != "dpo" and mode == "preference":
        return [f"train.objective: {objective!r} trains on text or conversations, but {cfg.train.dataset} is a preference "
                "dataset (data.mode: preference); set train.objective: dpo"]
    if objective == "dpo" and hf_config is not None and is_seq2seq(hf_config):
        return ["train.objective: dpo trains causal LMs; this model is encoder-decoder (T5)"]
    return []


def reference_params(cfg, total_params: int) -> int:
    """Parameters of the reference model held through training: none under LoRA (the base with the
    adapter disabled) or once precomputed; a whole frozen copy otherwise."""
    t = cfg.train
    if t.objective != "dpo" or cfg.model.lora is not None or t.dpo.precompute_reference:
        return 0
    return total_params
