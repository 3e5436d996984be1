"""A recorded step's perturbed passes run ahead of its forward, without the previous step's ``.grad``.

They read only the batch, ``theta``, ``g_V`` and ``eps``, so where the step's products are
streamed (one process, one micro-batch) the recorder takes them in ``begin_micro_batch``, after
the stale gradients are let go (``release_stale_gradients``: Lightning's zero_grad would drop
them before the backward anyway). The scores must be those of the passes taken after the
backward; training must not change; and where Lightning would keep the old ``.grad`` (a
zero_grad of one's own, accumulation) the callback must keep it too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from diffin_lightning import DiffInCallback
from diffin_lightning.engine import CapturedStep
from diffin_lightning.recorder import InfluenceRecorder
from helpers import TinyClassifier, TinyData, trainer


class WideClassifier(TinyClassifier):
    """Layers wide enough that the streams take some of them (and hold the others)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


class WideDropoutClassifier(TinyClassifier):
    """Dropout draws masks: the early passes must replay the training step's, as the late ones do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


class KeepsGradients(WideClassifier):
    """Zeroes .grad instead of dropping it: Lightning's zero_grad is not the default one."""

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=False)


COMPONENTS = ("first_order", "second_order", "diffin", "visits")


def _fit(tmp_path, model: nn.Module, data: TinyData, accumulate: int = 1, **options: Any) -> tuple[DiffInCallback, nn.Module]:
    callback = DiffInCallback(targets={"val": data.val, "self": "self"}, eps=1e-6, target_refresh_every_n_steps=2, **options)
    trainer(default_root_dir=tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[callback]).fit(model, data.loader(batch_size=4))
    return callback, model


def _assert_same_training(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name}: training changed"


def _watch_perturbed_passes(monkeypatch) -> list[dict[str, Any]]:
    """Every perturbed pass: whether it ran ahead of the forward, and whether any parameter held a .grad then."""
    passes: list[dict[str, Any]] = []
    original = CapturedStep.perturbed_along

    def watched(self, shift, along):
        module = self.loss.module
        passes.append(
            dict(
                early=not self.batch_gradient,  # the early passes' view has no batch gradient: the step has not run
                stale=any(p.grad is not None for p in module.parameters()),
                step=module.trainer.global_step,
            )
        )
        return original(self, shift, along)

    monkeypatch.setattr(CapturedStep, "perturbed_along", watched)
    return passes


@pytest.mark.parametrize(
    ("scheme", "make"), [("forward", WideClassifier), ("central", WideClassifier), ("forward", WideDropoutClassifier)], ids=["forward", "central", "dropout"]
)
def test_passes_ahead_of_the_forward_give_the_scores_of_passes_after_the_backward(tmp_path, monkeypatch, scheme, make):
    data = TinyData.make(num_train=16, num_val=6, seed=3)
    passes = _watch_perturbed_passes(monkeypatch)
    # (Building the model seeds the global RNG: both fits draw the same dropout masks.)
    early, early_model = _fit(tmp_path / "early", make().double(), data, finite_difference=scheme)
    taken_early = list(passes)
    passes.clear()
    monkeypatch.setattr(InfluenceRecorder, "_early_passes", lambda self, *args: None)  # every pass after the backward
    late, late_model = _fit(tmp_path / "late", make().double(), data, finite_difference=scheme)
    per_step = 2 if scheme == "central" else 1
    assert len(taken_early) == len(passes) == 8 * per_step  # 2 epochs of 4 steps, one target with a second order
    assert all(p["early"] for p in taken_early) and not any(p["early"] for p in passes)
    for name in ("val", "self"):
        for component in COMPONENTS:
            expected = late.influence[name].component(component)
            torch.testing.assert_close(early.influence[name].component(component), expected, rtol=1e-12, atol=1e-15 * expected.abs().max())
    _assert_same_training(early_model, late_model)


def test_the_early_passes_run_without_the_previous_steps_gradients_and_the_fit_ends_without_them(tmp_path, monkeypatch):
    data = TinyData.make(num_train=16, num_val=6, seed=3)
    passes = _watch_perturbed_passes(monkeypatch)
    callback, released = _fit(tmp_path / "released", WideClassifier().double(), data)
    assert callback._stale_gradients_releasable
    assert [p["step"] for p in passes] == list(range(8)) and not any(p["stale"] for p in passes)
    assert all(p.grad is None for p in released.parameters())  # let go before the end-of-fit pass too
    passes.clear()
    kept_callback, kept = _fit(tmp_path / "kept", WideClassifier().double(), data, release_stale_gradients=False)
    assert not kept_callback._stale_gradients_releasable
    # Step 0 has no previous step; from step 1 on the old .grad sits beside the pass when it is kept.
    assert [p["stale"] for p in passes] == [False] + [True] * 7
    assert all(p.grad is not None for p in kept.parameters())
    for name in ("val", "self"):
        for component in COMPONENTS:
            assert torch.equal(callback.influence[name].component(component), kept_callback.influence[name].component(component))
    _assert_same_training(released, kept)


def test_gradients_lightning_would_keep_are_kept(tmp_path, monkeypatch):
    """A zero_grad of one's own (it may keep .grad), or accumulation (the micro-batches add up in .grad)."""
    data = TinyData.make(num_train=16, num_val=6, seed=3)
    passes = _watch_perturbed_passes(monkeypatch)
    callback, model = _fit(tmp_path / "own_zero_grad", KeepsGradients().double(), data)
    assert not callback._stale_gradients_releasable
    assert [p["stale"] for p in passes] == [False] + [True] * 7 and all(p["early"] for p in passes)
    assert all(p.grad is not None for p in model.parameters())
    passes.clear()
    callback, model = _fit(tmp_path / "accumulated", WideClassifier().double(), data, accumulate=2)
    assert not callback._stale_gradients_releasable
    assert passes and not any(p["early"] for p in passes)  # a step of two micro-batches is known only after its backward
    assert all(p.grad is not None for p in model.parameters())
