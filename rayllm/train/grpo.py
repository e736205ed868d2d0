"""Group relative policy optimisation (`train.objective: grpo`): online RL with vLLM rollouts on Ray.

One iteration, one step (`train.max_steps` iterations), driven by the training workers, as OpenRLHF's
trainer drives its engines:

    rank 0: save adapter → policy/v{i}  ─┐
    rollout actors: add it as LoRA id i+1, sample group_size completions per prompt (policy version i)
    rank 0: rewards from code → group-normalised advantages → broadcast the batch to every rank
    every rank: its slice of completions, updates_per_batch × (accumulation micro-batches → step)
    rank 0: metrics.jsonl; held-out greedy reward every eval_every; checkpoint every save_every

Why the workers drive: the policy's weights live there (DeepSpeed), so saving the adapter is local,
and checkpoints, resume, the run store and metrics are the ones every objective uses. Prompts are
ordered by `StreamOrder` over the prompt set and the checkpoint's cursor, so a resumed run asks the
same prompts. Old log-probs are the trainer's own (vLLM's differ numerically; their gap is logged as
`logp_gap_vllm`); with updates_per_batch 1 they equal the current ones, as TRL uses them. With LoRA
the reference is the base with the adapter disabled, and weights reach the engines as an adapter
folder. A full fine-tune (no model.lora) sends its weights instead: rank 0's copy of every parameter
(whole under ZeRO <= 2) goes into Ray's object store once, or is broadcast over a torch.distributed
group of rank 0 and the engines (`rollout.weight_sync`), and each engine loads it in place; it
keeps no reference model, so beta must be 0. No loss-spike rollback: a policy-gradient loss has no
level that a spike could be measured against.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from rayllm.train import checkpoint as ckpt
from rayllm.train.grpo_loss import group_advantages, token_logps, token_loss
from rayllm.train.loop import all_sum, say
from rayllm.train.rollout import PromptSet, RolloutPool, prompts_of, sampling_params

if TYPE_CHECKING:
    from rayllm.train.worker import Run


class StaleRollout(RuntimeError):
    """A rollout came from another policy version than the one being trained."""


class Grpo:
    """What a GRPO run holds beside the worker's `Run`: prompts, rewards, the rollout actors (rank 0)."""

    spike_floor = 0.0

    def __init__(self, spec, train: PromptSet, val: PromptSet, tokenizer, rank: int):
        from rayllm.eval.generate import stop_ids
        from rayllm.train.rewards import Scorer

        self.cfg, self.spec, self.train, self.val = spec.train.grpo, spec, train, val
        self.scorer = Scorer(self.cfg.rewards, self.cfg.max_new_tokens)
        self.stop_ids, self.pad_id = stop_ids(tokenizer), tokenizer.pad_token_id or 0
        self.lora = spec.model.lora is not None
        self.pool = RolloutPool(spec.base_dir, self.cfg.rollout, spec.model.lora.rank if self.lora else 0,
                                spec.train.seed) if rank == 0 else None
        self.last_train: dict[str, float] = {}
        self._adapter: dict | None = None

    # ---- rank 0: the policy's adapter to the engines, rollouts, rewards ----
    def adapter(self, run: Run, version: int) -> dict:
        """Save the policy as policy/v{version} (collective) and name it for the engines: a new LoRA id per version.
        A full fine-tune's weights go into the engines instead (rank 0); the dict then names no adapter."""
        from rayllm.train import export

        if self._adapter is not None and self._adapter["version"] == version:  # saved for the evaluation just before
            return self._adapter
        if not self.lora:
            self._adapter = {"name": None, "id": None, "path": None, "version": version}
            if self.pool is not None:
                weights = full_weights(run.engine, to_cpu=self.pool.backend != "nccl")
                self._adapter["sync"] = {**self.pool.load_weights(weights, version, [CHECKSUM_PARAM]),
                                         "trainer_checksums": {CHECKSUM_PARAM: float(weights[CHECKSUM_PARAM].double().sum())}}
            return self._adapter
        path = run.store.local / "policy" / f"v{version}"
        export.save_adapter(run.engine, path, {"policy_version": version})
        self._adapter = {"name": f"policy-v{version}", "id": version + 1, "path": str(path), "version": version}
        return self._adapter

    def rollouts(self, adapter: dict, prompts: np.ndarray) -> dict:
        """group_size completions of each prompt, scored: the batch every rank trains on (rank 0)."""
        c, p = self.cfg, self.train
        out = self.pool.generate([p.prompt_ids[i] for i in prompts], adapter, sampling_params(c, self.stop_ids), c.group_size)
        completions = [comp for group in out["groups"] for comp in group]
        owners = [int(i) for i in prompts for _ in range(c.group_size)]
        rows = [{**p.row(i), "completion_tokens": len(comp["ids"])} for i, comp in zip(owners, completions)]
        scores = self.scorer.score([r["prompt"] for r in rows], [comp["text"] for comp in completions], rows)
        import torch

        advantages = group_advantages(torch.tensor(scores.total, dtype=torch.float64), c.group_size).tolist()
        tokens = sum(len(comp["ids"]) for comp in completions)
        return {"prompt_ids": [p.prompt_ids[i] for i in owners], "completions": completions, "advantages": advantages,
                "rewards": scores.total, "per_reward": scores.per_reward, "reward_errors": scores.errors,
                "reward_last_error": scores.last_error, "versions": [v for v in out["group_versions"] for _ in range(c.group_size)],
                "engines": out["engines"], "lora_ids": out["lora_ids"], "loaded": out["loaded"], "tokens": tokens,
                "gen_seconds": out["seconds"], "prompt_index": owners, "group_size": c.group_size,
                "actors_replaced": out["actors_replaced"]}

    def held_out(self, adapter: dict) -> dict[str, float]:
        """Greedy answers to the first eval_prompts val prompts, scored: val_reward and val_reward/<name> (rank 0)."""
        v, n = self.val, min(self.cfg.eval_prompts, len(self.val))
        out = self.pool.generate(v.prompt_ids[:n], adapter, sampling_params(self.cfg, self.stop_ids, greedy=True), 1)
        texts = [g[0]["text"] for g in out["groups"]]
        rows = [{**v.row(i), "completion_tokens": len(g[0]["ids"])} for i, g in enumerate(out["groups"])]
        scores = self.scorer.score([r["prompt"] for r in rows], texts, rows)
        return {"val_reward": float(np.mean(scores.total)),
                **{f"val_reward/{k}": float(np.mean(x)) for k, x in scores.per_reward.items()}}

    # ---- every rank: the policy update ----
    def micro_batches(self, batch: dict, rank: int, micro: int, accum: int, device) -> list[dict]:
        """This rank's completions as accumulation micro-batches: prompt + completion right-padded, the
        mask on the completion tokens (in next-token positions), advantages and vLLM's log-probs."""
        import torch

        per_rank = micro * accum
        out = []
        for m in range(accum):
            rows = range(rank * per_rank + m * micro, rank * per_rank + (m + 1) * micro)
            seqs = [(batch["prompt_ids"][k], batch["completions"][k]) for k in rows]
            width = max(len(p) + len(c["ids"]) for p, c in seqs)
            ids = np.full((micro, width), self.pad_id, dtype=np.int64)
            attn, mask, vllm = np.zeros((micro, width), np.int64), np.zeros((micro, width - 1)), np.zeros((micro, width - 1))
            for j, (p, c) in enumerate(seqs):
                n, k = len(p), len(c["ids"])
                ids[j, :n + k], attn[j, :n + k], mask[j, n - 1:n - 1 + k] = p + c["ids"], 1, 1
                vllm[j, n - 1:n - 1 + len(c["vllm_logps"])] = c["vllm_logps"]
            out.append({"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(attn).to(device),
                        "mask": torch.from_numpy(mask).float().to(device), "vllm_logps": torch.from_numpy(vllm).float().to(device),
                        "advantages": torch.tensor([batch["advantages"][k] for k in rows], dtype=torch.float32, device=device),
                        "versions": [batch["versions"][k] for k in rows]})
        return out

    def logps(self, engine, mb: dict, reference: bool = False):
        import contextlib

        import torch

        with torch.no_grad() if reference else contextlib.nullcontext():
            with engine.module.disable_adapter() if reference else contextlib.nullcontext():
                logits = engine(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        return token_logps(logits, mb["input_ids"])

    def update(self, run: Run, batch: dict, version: int) -> dict[str, float]:
        """updates_per_batch optimizer steps over the batch; each rank its slice (collective)."""
        import torch

        c, b, engine = self.cfg, run.spec.batching, run.engine
        mbs = self.micro_batches(batch, run.rank, b.micro_batch_size, b.gradient_accumulation_steps, run.device)
        for mb in mbs:
            if any(v != version for v in mb["versions"]):
                raise StaleRollout(f"rollouts of policy versions {sorted(set(mb['versions']))} in the update of version {version}")
            with torch.no_grad():
                mb["old"] = self.logps(engine, mb) if c.updates_per_batch > 1 else None
                mb["ref"] = self.logps(engine, mb, reference=True) if c.beta else None
        total_tokens = sum(len(comp["ids"]) for comp in batch["completions"])
        scale = b.gradient_accumulation_steps * run.world / total_tokens  # DeepSpeed divides by both again
        sums = np.zeros(5)  # loss, kl, clipped tokens, |logp - vllm logp|, tokens (the last two: first pass only)
        for u in range(c.updates_per_batch):
            for mb in mbs:
                logps = self.logps(engine, mb)
                old = mb["old"] if mb["old"] is not None else logps.detach()
                loss, kl, clipped = token_loss(logps, old, mb["advantages"], c.epsilon, c.beta, mb["ref"])
                m = mb["mask"]
                total = (loss * m).sum()
                engine.backward(total * scale)
                engine.step()
                sums[:3] += [total.item(), (kl * m).sum().item() if kl is not None else 0.0, (clipped * m).sum().item()]
                if u == 0:
                    sums[3:] += [((old - mb["vllm_logps"]).abs() * m).sum().item(), m.sum().item()]
        loss, kl, clipped, gap, tokens = all_sum(list(sums), run.device)
        passes = tokens * c.updates_per_batch
        out = {"loss": loss / passes, "clip_fraction": clipped / passes, "logp_gap_vllm": gap / tokens}
        if c.beta:
            out["kl"] = kl / passes
        return out


# A parameter vLLM's Llama-family models keep under its Hugging Face name (q/k/v and gate/up are fused there).
CHECKSUM_PARAM = "model.norm.weight"


def full_weights(engine, to_cpu: bool = True) -> dict:
    """Rank 0's policy weights under Hugging Face names: CPU copies, or (an NCCL broadcast reads them
    where they are) the parameters themselves. Whole under ZeRO <= 2 (stage 3 shards them; preflight
    refuses it for a full-FT GRPO run)."""
    return {k: v.detach().to("cpu", copy=True) if to_cpu else v.detach() for k, v in engine.module.state_dict().items()}


def summary(batch: dict) -> dict[str, float]:
    """Reward and rollout figures of one batch (rank 0)."""
    lengths = [len(comp["ids"]) for comp in batch["completions"]]
    groups = np.asarray(batch["rewards"]).reshape(-1, batch["group_size"])
    out = {"reward_mean": float(np.mean(batch["rewards"])), "reward_std": float(np.std(batch["rewards"])),
           "frac_groups_zero_std": float(np.mean(groups.std(axis=1) == 0)), "completion_length": float(np.mean(lengths)),
           "rollout_tokens": batch["tokens"], "rollout_tokens_per_s": batch["tokens"] / max(batch["gen_seconds"], 1e-9)}
    for name, values in batch["per_reward"].items():
        out[f"reward/{name}"] = float(np.mean(values))
        out[f"reward_std/{name}"] = float(np.std(values))
        out[f"reward_errors/{name}"] = batch["reward_errors"].get(name, 0)
    return out


def broadcast(obj, rank: int):
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_iterations(run: Run, state: ckpt.TrainState) -> tuple[ckpt.TrainState, dict]:
    """GRPO iterations from `state` to train.max_steps (or stop_at_step); returns (state, last held-out eval)."""
    g, t = run.objective, run.spec.train
    stop = min(t.stop_at_step or t.max_steps, t.max_steps)
    n_prompts = run.spec.batching.global_batch // g.cfg.group_size
    last_eval: dict = {}
    if state.step == 0 and g.cfg.eval_prompts:  # the starting policy's held-out reward: the "before" figure
        last_eval = evaluate(run, g, g.adapter(run, 0), 0)
    carried = 0.0  # evaluation and checkpoint time after an iteration's record: the next record's "other"
    try:
        while state.step < stop:
            start, version = time.perf_counter(), state.step
            adapter = g.adapter(run, version)
            gen_start = time.perf_counter()
            prompts = run.order.global_batch(state.cursor, n_prompts)
            batch = broadcast(g.rollouts(adapter, prompts) if run.rank == 0 else None, run.rank)
            train_start = time.perf_counter()
            figures = g.update(run, batch, version)
            done = time.perf_counter()
            state.step, state.cursor = state.step + 1, state.cursor + 1
            g.last_train = {**figures, **(summary(batch) if run.rank == 0 else {})}
            record = {"step": state.step, "policy_version": version, "lora_id": adapter["id"], "prompts": prompts.tolist(), **g.last_train,
                      "lr": run.scheduler.get_last_lr()[0], "time/generation_s": train_start - gen_start,
                      "time/training_s": done - train_start, "time/other_s": carried + (gen_start - start)}
            if run.rank == 0:
                record.update(engines=batch["engines"], engines_loaded=batch["loaded"], rollout_versions=sorted(set(batch["versions"])),
                              actors_replaced=batch["actors_replaced"], **adapter.get("sync", {}))
                record["time/other_fraction"] = record["time/other_s"] / (done - start + carried)
                for name, err in batch["reward_last_error"].items():
                    say(f"reward {name} failed {batch['reward_errors'][name]}× in iteration {version}: {err}")
                say(f"iteration {state.step}/{t.max_steps} reward {record['reward_mean']:.3f} loss {record['loss']:.4f} "
                    f"{record['rollout_tokens_per_s']:,.0f} rollout tok/s")
            run.log.log(record)
            after = time.perf_counter()
            if g.cfg.eval_prompts and (state.step % t.eval_every == 0 or state.step == stop):
                last_eval = evaluate(run, g, g.adapter(run, state.step), state.step)
            if state.step % t.save_every == 0 or state.step == stop:
                folder = ckpt.save(run.engine, state, run.rank, run.save_hf_files, exclude_frozen=True)
                ckpt.report({"step": state.step, **{k: v for k, v in g.last_train.items() if isinstance(v, float)}, **last_eval},
                            folder, state.step)
                if run.rank == 0:
                    run.store.push("metrics.jsonl")
            carried = time.perf_counter() - after
    finally:
        if g.pool is not None:
            g.pool.close()
    return state, last_eval


def evaluate(run: Run, g: Grpo, adapter: dict, step: int) -> dict:
    """Held-out greedy reward with the policy `adapter` holds, logged and shared with every rank."""
    figures = broadcast(g.held_out(adapter) if run.rank == 0 else None, run.rank)
    run.log.log({"event": "eval", "step": step, **figures})
    if run.rank == 0:
        say(f"held-out reward at step {step}: {figures['val_reward']:.3f}")
    return figures


def setup(spec, train, val, tokenizer, rank: int) -> tuple[Grpo, PromptSet, PromptSet]:
    """(objective, train prompts, val prompts) of a GRPO run, from the packed sft splits."""
    train_prompts, val_prompts = prompts_of(train, tokenizer), prompts_of(val, tokenizer)
    if not len(train_prompts):
        raise ValueError(f"{spec.dataset}: no whole prompt + answer conversation in the train split")
    return Grpo(spec, train_prompts, val_prompts, tokenizer, rank), train_prompts, val_prompts


def preflight_problems(cfg, manifest: dict) -> list[str]:
    """GRPO needs prompts with answers (an sft dataset), LoRA, and a base model folder for the engines."""
    if cfg.train.objective != "grpo":
        return []
    problems = []
    if manifest.get("mode") != "sft":
        problems.append(f"train.objective: grpo reads prompts and reference answers from an sft dataset, but {cfg.train.dataset} "
                        f"was prepared with data.mode {manifest.get('mode')!r}; prepare it with data.mode: sft")
    if cfg.model.lora is None and cfg.train.zero_stage == 3:
        problems.append("train.objective: grpo without model.lora sends rank 0's whole weights to the engines, which ZeRO-3 "
                        "shards (gathering them is not built); set train.zero_stage to 2 or less, or add model.lora")
    if cfg.model.lora is None and cfg.train.grpo.beta:
        problems.append(f"train.grpo.beta {cfg.train.grpo.beta} without model.lora needs a reference model, which a full-FT GRPO "
                        "run does not keep (with LoRA it is the base, adapter disabled); set beta: 0 or add model.lora")
    if cfg.model.path is None:
        problems.append("train.objective: grpo needs model.path (a base model folder): the vLLM rollout engines load it")
    if cfg.model.quantization != "none":
        problems.append("train.objective: grpo does not take model.quantization (the engines load the unquantized base)")
    return problems
