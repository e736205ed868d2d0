"""A rollout actor that dies is replaced and its share of the generation asked again, once; fake actors
stand in for the vLLM ones (the real actor path runs in tests/ray/test_train_grpo.py)."""

from types import SimpleNamespace

import pytest
import ray
from ray.exceptions import RayActorError

from rayllm.train.rollout import RolloutActorLost, RolloutPool

ADAPTER = {"name": "policy-v3", "id": 4, "path": "/x", "version": 3}


class FakeActor:
    """Answers each prompt with one completion naming its engine; dies on the calls listed in `dies_on`."""

    def __init__(self, name: str, dies_on: set[int], calls: list):
        self.name, self.dies_on, self.calls, self.n = name, dies_on, calls, 0
        self.generate = SimpleNamespace(remote=self._generate)
        self.load_weights = SimpleNamespace(remote=self._load)

    def _load(self, weights, version, names):
        self.calls.append((self.name, "load", version))
        return lambda: {"checksums": {}, "version": version}

    def _generate(self, prompts, adapter, sampling, n):
        self.n += 1
        self.calls.append((self.name, [p[0] for p in prompts], adapter["id"]))
        if self.n in self.dies_on:
            return lambda: (_ for _ in ()).throw(RayActorError())
        return lambda: {"groups": [[{"ids": p, "text": self.name}] for p in prompts], "seconds": 0.1, "engine": self.name,
                        "lora_id": adapter["id"], "version": adapter["version"], "loaded": [adapter["id"]]}


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", lambda ref: [r() for r in ref] if isinstance(ref, list) else ref())
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(ray, "put", lambda value: value)


def pool(spawned: list, calls: list, dies: dict[str, set[int]]) -> RolloutPool:
    def spawn(k):
        name = f"a{k}.{sum(s.startswith(f'a{k}.') for s in spawned)}"
        spawned.append(name)
        return FakeActor(name, dies.get(name, set()), calls)

    return RolloutPool("/base", SimpleNamespace(num_actors=2, weight_sync="auto", actor_gpus=0), 8, 0, spawn=spawn)


def test_a_dead_actor_is_replaced_and_only_its_prompts_asked_again_with_the_current_policy(fake_ray):
    spawned, calls = [], []
    p = pool(spawned, calls, {"a1.0": {1}})
    out = p.generate([[0], [1], [2], [3]], ADAPTER, {}, 1)
    assert spawned == ["a0.0", "a1.0", "a1.1"] and out["actors_replaced"] == 1
    assert calls == [("a0.0", [0, 1], 4), ("a1.0", [2, 3], 4), ("a1.1", [2, 3], 4)]  # the new engine gets the same adapter
    assert [g[0]["ids"][0] for g in out["groups"]] == [0, 1, 2, 3], "groups stay in prompt order"
    assert out["engines"] == ["a0.0", "a1.1"] and out["versions"] == [3, 3]
    assert p.generate([[5], [6]], ADAPTER, {}, 1)["engines"] == ["a0.0", "a1.1"], "the replacement serves on"


def test_a_replacement_that_dies_too_ends_the_run_with_a_clear_error(fake_ray):
    spawned, calls = [], []
    p = pool(spawned, calls, {"a0.0": {1}, "a0.1": {1}})
    with pytest.raises(RolloutActorLost, match="rollout actor 0 died .* its replacement died too .* policy version 3"):
        p.generate([[0], [1]], ADAPTER, {}, 1)
    assert spawned == ["a0.0", "a1.0", "a0.1"]


def test_a_full_fine_tunes_replacement_actor_loads_the_current_weights_before_it_samples(fake_ray):
    spawned, calls = [], []
    p = pool(spawned, calls, {"a0.0": {1}})
    assert p.load_weights({"w": 1}, 7, ["w"])["engine_weight_versions"] == [7, 7]
    p.generate([[0], [1]], {**ADAPTER, "path": None}, {}, 1)
    assert calls[2:] == [("a0.0", [0], 4), ("a1.0", [1], 4), ("a0.1", "load", 7), ("a0.1", [0], 4)]
