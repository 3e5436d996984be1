"""Shared tiny float64 fixtures: a real Lightning module, real data, a trajectory recorder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # benchmarks.harness

from helpers import TinyData, compose_app_config  # noqa: E402


@pytest.fixture
def tiny_data() -> TinyData:
    return TinyData.make(num_train=16, num_val=6, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the train app's tiny experiment (influence, dynamics, trajectory log)."""
    from diffin_lightning.train import train

    run_dir = tmp_path_factory.mktemp("train")
    train(compose_app_config("train", ["experiment=tiny", "trainer.enable_progress_bar=false"]), run_dir)
    return run_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
