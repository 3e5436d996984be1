"""Shared tiny float64 fixtures: a real Lightning module, real data, a trajectory recorder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # benchmarks.harness

from helpers import TinyData  # noqa: E402


@pytest.fixture
def tiny_data() -> TinyData:
    return TinyData.make(num_train=16, num_val=6, seed=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
