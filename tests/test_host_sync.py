"""The per-step path never reads a value back to the host, checked on the CPU (CI has no GPU).

A read back (``bool(t)``, ``int(t)``, ``float(t)``, ``t.item()``) is the ATen op
``_local_scalar_dense`` on every device; on a GPU it waits for every queued kernel. A
``TorchDispatchMode`` around the callback's per-step hooks counts those ops, with the library
line that issued each, so that this test fails where the GPU test (``tests/test_gpu.py``, CUDA's
sync debug mode) would, naming the line.
"""

from __future__ import annotations

import os
import traceback

import pytest

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


# Ops whose result's size or value must reach the host: a scalar read, and those whose output shape
# depends on the data (nonzero, masked_select, indexing by a boolean mask), which wait for the GPU too.
_READS_BACK = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    # A tensor made from host values (``torch.tensor(x)``, ``torch.as_tensor(list)``): on a GPU, a copy
    # from pageable host memory, which CUDA's sync debug mode counts as synchronising (the H200 run of
    # 2026-11-26 failed on one in the 'train' target's bias correction that this set did not yet hold).
    torch.ops.aten.lift_fresh.default,
}


# Reads that happen on the CPU only, where they wait for nothing (on a GPU the same functions read nothing).
_NOT_COUNTED = {"check_id_range", "persistence_known_zero", "sum_scalars_over_ranks"}


class _ReadBacks(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS_BACK or (func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])):
            stack = traceback.extract_stack()[:-1]  # this method's own frame left out
            # The op's issuer: the innermost frame outside torch itself. Only this library's count (Lightning's
            # and the model's own, a per_sample_loss run inside the library's wrapper too, are not the
            # callback's cost). The sample ids' range is checked on every batch on the CPU only, where a read
            # back costs nothing (on a GPU, the first batch's only: sample_ids.SampleIdChecks), so `check_id_range` is not counted,
            # nor the damped extrapolation's check for a zero persistence (CPU only, `persistence_known_zero`);
            # nor is DDP's host agreement, `sum_scalars_over_ranks`, which tests/ddp_run.py counts on its own.
            issuer = next((f for f in reversed(stack) if f"{os.sep}torch{os.sep}" not in f.filename), None)
            frames = [f for f in stack if "diffin_lightning" in f.filename]
            if issuer is not None and "diffin_lightning" in issuer.filename and issuer.name not in _NOT_COUNTED:
                self.where.append(" <- ".join(f"{f.filename.split('diffin_lightning')[-1]}:{f.lineno}" for f in frames[-3:][::-1]))
        return func(*args, **(kwargs or {}))


def _strict(base, steps_from: int = 1):
    """``base`` with every training batch from ``steps_from`` on (the callback's hooks, and its capture's hooks
    inside the training step's forward and backward) watched for read backs issued by this library."""

    class Strict(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.read_backs: list[str] = []
            self._watch: _ReadBacks | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= steps_from:  # the first step checks the capture once (read backs)
                self._watch = _ReadBacks()
                self._watch.__enter__()
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if self._watch is not None:
                self._watch.__exit__(None, None, None)
                self.read_backs.extend(self._watch.where)
                self._watch = None

    return Strict


def test_recorded_steps_after_the_first_read_nothing_back(tmp_path, tiny_data):
    callback = _strict(DiffInCallback)(targets={"val": tiny_data.val, "train": "train", "self": "self"}, target_refresh_every_n_steps=100)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback.steps_recorded == 8
    assert callback.read_backs == [], sorted(set(callback.read_backs))


@pytest.mark.parametrize("fault", ["nan_loss", "nan_gradient"])
def test_steps_with_non_finite_values_are_gated_without_a_read_back(tmp_path, tiny_data, fault):
    """The gates skip and count a faulty step (test_nonfinite checks the counts) without reading anything back."""
    from test_nonfinite import FaultyClassifier, _faults_in_batches

    faults = _faults_in_batches(tiny_data, steps=[1, 4, 6], per_step=2)
    callback = _strict(DiffInCallback)(targets={"val": tiny_data.val, "train": "train", "self": "self"}, target_refresh_every_n_steps=100)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(FaultyClassifier(**{fault: faults}).double(), tiny_data.loader())
    assert callback.read_backs == [], sorted(set(callback.read_backs))
    assert callback.nonfinite_steps_skipped == {"val": 3, "train": 3}


@pytest.mark.parametrize(
    "setting",
    [
        dict(compute_second_order=False),
        dict(every_n_steps=2),
        dict(second_order="sum"),  # ('propagated', the default, is run by the tests above)
        # Refreshes every other step: the damped extrapolation measures its persistence (after the first
        # two changes) and extrapolates between refreshes, all of it on the device.
        dict(target_refresh_every_n_steps=2, target_extrapolation="damped"),
        dict(target_refresh_every_n_steps=2, target_extrapolation="linear"),
    ],
)
def test_other_settings_read_nothing_back_either(tmp_path, tiny_data, setting):
    setting = {"target_refresh_every_n_steps": 100, **setting}
    callback = _strict(DiffInCallback)(targets={"val": tiny_data.val, "self": "self"}, **setting)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback.steps_recorded > 0
    assert callback.read_backs == [], sorted(set(callback.read_backs))


def test_the_watch_sees_this_librarys_read_backs_and_names_the_line():
    from diffin_lightning.finite import all_finite

    with _ReadBacks() as watch:
        all_finite([torch.ones(3)])  # bool(...) of a tensor: one read back, in finite.py
        torch.ones(3)[torch.tensor([True, False, True])].sum().item()  # not this library's: not counted
    assert len(watch.where) == 1 and watch.where[0].startswith("/finite.py:"), watch.where


def test_the_watch_sees_a_tensor_made_from_host_values():
    """The 'train' target's bias correction once made its decay a tensor each step (a copy that waits on a GPU)."""
    from diffin_lightning.targets import DatasetTarget, TrainingLossTarget

    with _ReadBacks() as watch:  # loading a checkpoint makes its flag from a host bool: seen (it is no step's)
        DatasetTarget("val", TensorDataset(torch.zeros(2, 1))).load_state_dict({"gradient_finite": True}, torch.device("cpu"))
    assert len(watch.where) == 1 and watch.where[0].startswith("/targets.py:"), watch.where

    target = TrainingLossTarget(decay=0.9)
    target.average, target.updates = {"w": torch.ones(2, dtype=torch.float64)}, torch.tensor(3)
    with _ReadBacks() as watch:
        estimate = target.current_estimate()
        torch.tensor(0.5)  # not this library's: not counted
    assert watch.where == [], watch.where
    torch.testing.assert_close(estimate["w"], torch.ones(2, dtype=torch.float64) / (1 - 0.9**3))
    with _ReadBacks() as watch:
        from diffin_lightning.finite import finite_flag

        finite_flag([], torch.device("cpu"))  # torch.ones: made on the device, not from host values
        target.updates = 3  # a host count (no device gate yet): the power on the host, nothing made from it
        target.current_estimate()
    assert watch.where == [], watch.where
