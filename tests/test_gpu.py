"""On a CUDA device the callback computes where the model lives and agrees with the CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


@pytest.mark.gpu
def test_cuda_scores_match_cpu_scores(tmp_path, tiny_data):
    results = {}
    for accelerator in ("cpu", "cuda"):
        callback = DiffInCallback(targets={"val": tiny_data.val, "train": "train", "self": "self"}, eps=1e-6)
        model = TinyClassifier().double()
        trainer(default_root_dir=tmp_path / accelerator, accelerator="gpu" if accelerator == "cuda" else "cpu", max_epochs=2, callbacks=[callback]).fit(
            model, tiny_data.loader()
        )
        assert all(t.device.type == accelerator for sums in callback._sums.values() for t in sums.values())
        results[accelerator] = callback.influence
    for name in results["cpu"]:
        for component in ("first_order", "second_order", "diffin", "visits"):
            torch.testing.assert_close(results["cuda"][name].component(component), results["cpu"][name].component(component), rtol=1e-6, atol=1e-9)
