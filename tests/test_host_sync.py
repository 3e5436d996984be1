"""The per-step path never reads a value back to the host, checked on the CPU (CI has no GPU).

A read back (``bool(t)``, ``int(t)``, ``float(t)``, ``t.item()``) is the ATen op
``_local_scalar_dense`` on every device; on a GPU it waits for every queued kernel. A
``TorchDispatchMode`` around the callback's per-step hooks counts those ops, with the library
line that issued each, so that this test fails where the GPU test (``tests/test_gpu.py``, CUDA's
sync debug mode) would, naming the line.
"""

from __future__ import annotations

import traceback

import pytest

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


# Ops whose result's size or value must reach the host: a scalar read, and those whose output shape
# depends on the data (nonzero, masked_select, indexing by a boolean mask), which wait for the GPU too.
_READS_BACK = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class _ReadBacks(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS_BACK or (func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])):
            frames = [f for f in traceback.extract_stack() if "diffin_lightning" in f.filename]
            # One of this library's (Lightning's and the model's own are not the callback's cost). The sample
            # ids' range is checked on every batch on the CPU only, where a read back costs nothing (on a GPU,
            # the first batch's): `_sample_ids` says so, so that one is not counted here.
            if frames and frames[-1].name != "_sample_ids":
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


@pytest.mark.parametrize("setting", [dict(compute_second_order=False), dict(every_n_steps=2), dict(second_order="propagated")])
def test_other_settings_read_nothing_back_either(tmp_path, tiny_data, setting):
    callback = _strict(DiffInCallback)(targets={"val": tiny_data.val, "self": "self"}, target_refresh_every_n_steps=100, **setting)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback.steps_recorded > 0
    assert callback.read_backs == [], sorted(set(callback.read_backs))


def test_the_watch_sees_this_librarys_read_backs_and_names_the_line():
    from diffin_lightning.finite import all_finite

    with _ReadBacks() as watch:
        all_finite([torch.ones(3)])  # bool(...) of a tensor: one read back, in finite.py
        torch.ones(3)[torch.tensor([True, False, True])].sum().item()  # not this library's: not counted
    assert len(watch.where) == 1 and watch.where[0].startswith("/finite.py:"), watch.where
