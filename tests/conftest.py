import os
import sys
from pathlib import Path

import pytest

# Set before any test imports ray/torch/deepspeed: quiet, offline, and DeepSpeed's CPU ops are
# JIT-built once into a cache shared by every test run on this machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rayllm" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)  # tests start their own local Ray, never a cluster found on the machine


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def _shared_ray():
    from tests.shared_ray import SHARED

    try:
        yield SHARED
    finally:
        SHARED.stop()


def pytest_runtest_setup(item):
    """Only tests that share the session's Ray run beside it (see tests/shared_ray.py)."""
    if "_shared_ray" not in item.fixturenames and "tests.shared_ray" in sys.modules:
        sys.modules["tests.shared_ray"].SHARED.stop()


@pytest.fixture
def ray_local(_shared_ray):
    """The session's private 2-CPU Ray (tests/shared_ray.py), started on first use."""
    import ray

    _shared_ray.ensure()
    yield ray


@pytest.fixture
def own_ray(_shared_ray):
    """For a test whose code starts its own Ray (its workers must inherit what the test sets in the
    environment): the shared Ray is shut down first; the next test that shares starts it again."""
    _shared_ray.stop()
    yield
