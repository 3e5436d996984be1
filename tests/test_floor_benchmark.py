"""The floor benchmark's bare callback runs the passes the DiffInCallback runs, at the same schedule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from benchmarks.floor import FloorCallback
from benchmarks.overhead import SETTINGS, fit_once, workloads
from diffin_lightning import targets


def _callback_target_passes(monkeypatch: pytest.MonkeyPatch, setting: dict[str, Any], output_dir: str) -> int:
    """How many passes over the target a real 1-epoch DiffInCallback fit makes (its refreshes, counted as they run)."""
    calls: list[bool] = []
    refresh = targets.DatasetTarget._refresh

    def counted(self: targets.DatasetTarget, *args: Any, **kwargs: Any) -> Any:
        calls.append(True)
        return refresh(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(targets.DatasetTarget, "_refresh", counted)
        fit_once(workloads()["cnn"], "cpu", 1, setting, output_dir=output_dir)
    return len(calls)


@pytest.mark.parametrize(
    ("setting", "floor"),
    [
        ("first order (defaults)", dict(second_order=False)),
        ("Diff-In (defaults)", dict(second_order=True)),
        ("Diff-In, every 10 steps", dict(second_order=True, every_n_steps=10)),
    ],
)
def test_the_floor_runs_the_callbacks_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, setting: str, floor: dict[str, Any]) -> None:
    # The bundled CNN on digits, 1 epoch: 1,079 training samples in 17 steps of 64, 359 target samples.
    bare = FloorCallback(**floor)
    fit_once(workloads()["cnn"], "cpu", 1, None, extra_callbacks=[bare])
    recorded = 17 if floor.get("every_n_steps", 1) == 1 else 2  # steps 0 and 10
    assert bare.counts["refreshes"] == _callback_target_passes(monkeypatch, SETTINGS[setting], str(tmp_path))
    assert bare.counts["target samples"] == 359 * bare.counts["refreshes"]
    assert bare.counts["product forwards"] == recorded
    assert bare.counts["perturbed passes"] == (recorded if floor["second_order"] else 0)
    assert bare.counts["end-of-fit samples"] == (1079 if floor["second_order"] else 0)


class _KeepModel(pl.Callback):
    def __init__(self) -> None:
        self.parameters: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.parameters = {name: value.detach().clone() for name, value in pl_module.named_parameters()}


def test_the_floor_leaves_the_training_run_as_it_was() -> None:
    # The floor shifts the parameters along g_V and back around each perturbed pass: extra work,
    # never a different run (the fit's final parameters equal a plain fit's to float32 rounding).
    with_floor, plain = _KeepModel(), _KeepModel()
    fit_once(workloads()["cnn"], "cpu", 1, None, extra_callbacks=[FloorCallback(second_order=True), with_floor])
    fit_once(workloads()["cnn"], "cpu", 1, None, extra_callbacks=[plain])
    assert with_floor.parameters.keys() == plain.parameters.keys()
    for name, value in with_floor.parameters.items():
        torch.testing.assert_close(value, plain.parameters[name], rtol=1e-4, atol=1e-5)
