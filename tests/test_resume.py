"""State lives in checkpoints: a run killed after epoch k and resumed equals one never interrupted."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from diffin_lightning import DiffInCallback, load_influence
from helpers import TinyClassifier, trainer


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _callback(tiny_data):
    return DiffInCallback(
        targets={"val": tiny_data.val, "train": "train", "self": "self"},
        target_refresh_every_n_steps=3,
        every_n_steps=2,
        eps=1e-6,
    )


def test_crash_and_resume_equals_uninterrupted(tmp_path, tiny_data):
    epochs = 4
    reference = _callback(tiny_data)
    trainer(default_root_dir=tmp_path / "full", max_epochs=epochs, callbacks=[reference]).fit(
        TinyClassifier().double(), tiny_data.loader()
    )

    checkpoints = tmp_path / "ckpt"
    first = _callback(tiny_data)
    crashing = trainer(
        default_root_dir=tmp_path / "crash",
        max_epochs=epochs,
        enable_checkpointing=True,
        callbacks=[first, ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_epochs=1), CrashAtEpoch(2)],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(TinyClassifier().double(), tiny_data.loader())
    # What was recorded before the crash is on disk, marked incomplete.
    partial = load_influence(tmp_path / "crash")
    assert partial.metadata["complete"] is False
    assert partial.metadata["steps_recorded"] > 0

    resumed = _callback(tiny_data)
    trainer(
        default_root_dir=tmp_path / "resumed",
        max_epochs=epochs,
        enable_checkpointing=True,
        callbacks=[resumed, ModelCheckpoint(dirpath=checkpoints, save_last=True)],
    ).fit(TinyClassifier().double(), tiny_data.loader(), ckpt_path=checkpoints / "last.ckpt")

    assert resumed.steps_recorded == reference.steps_recorded
    expected, actual = reference.influence, load_influence(resumed.output_path)
    assert actual.metadata["complete"] is True
    for name in expected:
        for component in ("first_order", "second_order", "diffin", "visits"):
            torch.testing.assert_close(actual[name].component(component), expected[name].component(component), rtol=1e-9, atol=1e-12)


def test_checkpoint_holds_the_scores_and_files_are_written_on_checkpoint(tmp_path, tiny_data):
    callback = DiffInCallback(targets={"self": "self"}, save_on_checkpoint=True, output_dir=tmp_path / "scores")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(default_root_dir=tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[callback, checkpoint]).fit(
        TinyClassifier().double(), tiny_data.loader()
    )
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    torch.testing.assert_close(state["sums"]["self"]["first_order"], callback.influence["self"].first_order)
    meta = json.loads((tmp_path / "scores" / "influence.json").read_text())
    assert meta["complete"] is True and meta["steps_recorded"] == 4
