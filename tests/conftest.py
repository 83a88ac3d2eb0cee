"""Suite-wide set-up: Triton's interpreter on machines without CUDA, seeds, markers, the hypothesis profile.

Tests ask for ``backend="triton"`` explicitly to check the kernels; on a CPU-only machine they then run in
Triton's interpreter. ``backend="auto"`` stays on the reference for CPU tensors either way.
"""

import os
import random

import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported, so this must run before anything imports
# tilewise's Triton code (or triton itself): conftest.py is loaded before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

from tilewise._backend import triton_available

SEED = 42

# "ci" (default): derandomized and small, so the suite is fast and a failure reproduces. "thorough": for a
# local hunt, `HYPOTHESIS_PROFILE=thorough pytest ...`.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch (every device), ``random`` and numpy with 42 before each test."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(SEED)  # noqa: NPY002 -- seeds the legacy global generator that third-party code may use


@pytest.fixture
def device() -> str:
    """Where ``backend="triton"`` runs: ``"cuda"`` on a GPU machine, else ``"cpu"`` (Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA and ``interpret`` tests without triton, saying why."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    skip_triton = pytest.mark.skip(reason="needs triton (pip install -e '.[triton,test]'; Linux only)")
    has_cuda, has_triton = torch.cuda.is_available(), triton_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("interpret") and not has_triton:
            item.add_marker(skip_triton)
