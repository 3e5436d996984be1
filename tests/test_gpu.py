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


@pytest.mark.gpu
def test_recorded_steps_after_the_first_never_synchronise_with_the_host(tmp_path, tiny_data):
    """eps, |g_V|, the curvature and the propagation factor stay on the device: CUDA's sync debug mode raises
    on any host synchronisation inside the callback's per-step hooks after the first step (which checks once)."""
    class Strict(DiffInCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            strict = trainer.global_step > 0
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            finally:
                torch.cuda.set_sync_debug_mode(0)

    callback = Strict(targets={"val": tiny_data.val, "train": "train", "self": "self"}, target_refresh_every_n_steps=100)
    trainer(default_root_dir=tmp_path, accelerator="gpu", max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback._recorder.use_capture and callback.steps_recorded == 8
