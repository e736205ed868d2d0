"""Serving replicas freeze the heap they built while starting (`rayllm.serve.app.freeze_startup_heap`),
so that a full garbage collection does not scan Ray's, Serve's and vLLM's start-up objects while
requests stream (one such collection took 407 ms inside a replica)."""

from __future__ import annotations

import asyncio
import gc

import pytest
from tests.unit.serve_fake_engine import FakeEngine

# The replicas' __del__ (engine shutdown) is a coroutine Serve awaits; here the objects are just dropped.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


class _StartedFakeEngine(FakeEngine):
    """FakeEngine built and started the way the replica builds VLLMEngine."""

    def __init__(self, cfg):
        super().__init__(model_name=cfg.served_model_name)

    async def start(self) -> None:
        pass


def test_the_llm_replica_freezes_its_startup_heap(tmp_path, monkeypatch, unfrozen):
    import rayllm.model
    import rayllm.serve.vllm_engine
    from rayllm.serve.app import _LLMServerWithRoutes

    monkeypatch.setattr(rayllm.serve.vllm_engine, "VLLMEngine", _StartedFakeEngine)
    monkeypatch.setattr(rayllm.model, "base_fingerprint", lambda model: "sha256:fake-base")
    replica = object.__new__(_LLMServerWithRoutes)
    asyncio.run(replica.__init__({"model": str(tmp_path), "stage_dir": str(tmp_path / "stage")}, None))
    assert replica.front is not None
    assert gc.get_freeze_count() > 0


def test_the_ingress_replica_freezes_its_startup_heap(tmp_path, unfrozen):
    from rayllm.serve.app import OpenAIIngress

    replica = object.__new__(OpenAIIngress.func_or_class)
    asyncio.run(replica.__init__(None, {"model": str(tmp_path)}, None))
    assert replica.front is not None
    assert gc.get_freeze_count() > 0
