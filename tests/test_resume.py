"""State lives in checkpoints: a run killed after epoch k and resumed equals one never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from diffin_lightning import DiffInCallback, EpochSeededSampler, IndexedDataset, ResumableDataLoader, load_influence
from helpers import TinyClassifier, trainer


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _callback(tiny_data, **options):
    return DiffInCallback(
        targets={"val": tiny_data.val, "train": "train", "self": "self"},
        target_refresh_every_n_steps=3,
        every_n_steps=2,
        eps=1e-6,
        **options,
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


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class DiesWritingCheckpoint(TorchCheckpointIO):
    """Real checkpoint I/O that dies before writing the checkpoint of one step (a kill between hook and write)."""

    def __init__(self, die_at_step: int) -> None:
        self.die_at_step = die_at_step

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == self.die_at_step:
            raise RuntimeError("died while writing the checkpoint")
        super().save_checkpoint(checkpoint, path, storage_options)


def _checkpointed_run(tmp_path, tiny_data, *extra, plugins=None):
    callback = DiffInCallback(targets={"val": tiny_data.val, "self": "self"}, save_on_checkpoint=True, output_dir=tmp_path / "scores")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3, save_top_k=-1)
    run = trainer(default_root_dir=tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[callback, checkpoints, *extra], plugins=plugins)
    with pytest.raises(RuntimeError):
        run.fit(TinyClassifier().double(), tiny_data.loader())
    return callback


def test_files_written_with_a_checkpoint_belong_to_its_step(tmp_path, tiny_data):
    callback = _checkpointed_run(tmp_path, tiny_data, CrashAtStep(8))  # checkpoints at steps 3 and 6
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    loaded = load_influence(tmp_path / "scores")
    assert checkpoint["global_step"] == 6
    assert loaded.metadata["global_step"] == 6 and loaded.metadata["complete"] is False
    assert loaded.metadata["epoch"] == checkpoint["epoch"]
    saved = checkpoint["callbacks"][callback.state_key]["sums"]
    for name in ("val", "self"):
        torch.testing.assert_close(loaded[name].first_order, saved[name]["first_order"], rtol=0, atol=0)
        torch.testing.assert_close(loaded[name].visits, saved[name]["visits"], rtol=0, atol=0)


def test_files_are_never_ahead_of_the_last_checkpoint(tmp_path, tiny_data):
    # The process dies after the callback's on_save_checkpoint at step 6 but before the checkpoint
    # reaches the disk: the files must still be those of step 3, like last.ckpt.
    _checkpointed_run(tmp_path, tiny_data, plugins=[DiesWritingCheckpoint(die_at_step=6)])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert load_influence(tmp_path / "scores").metadata["global_step"] == 3


def _resumable_loader(tiny_data):
    indexed = IndexedDataset(tiny_data.train)
    return ResumableDataLoader(indexed, batch_size=4, sampler=EpochSeededSampler(len(indexed), seed=0))


@pytest.mark.parametrize(
    "every_n_train_steps, crash_at, options",
    [(3, 7, {}), (5, 11, {}), (4, 9, {}), (5, 11, {"target_extrapolation": True}), (3, 7, {"target_extrapolation": "none"})],
    # The defaults extrapolate g_V damped (refreshed every 3 steps here): its slope, persistence and last change's sketch
    # travel in the checkpoint (the crash at 11 resumes from 10, past the refresh at 8 that measured a persistence).
    ids=["mid-epoch", "mid-epoch-2", "epoch-end", "linear-extrapolation", "held-target"],
)
def test_resume_from_a_step_checkpoint_mid_epoch_equals_uninterrupted(tmp_path, tiny_data, every_n_train_steps, crash_at, options):
    epochs = 4  # 4 steps per epoch
    reference = _callback(tiny_data, **options)
    trainer(default_root_dir=tmp_path / "full", max_epochs=epochs, callbacks=[reference]).fit(TinyClassifier().double(), _resumable_loader(tiny_data))

    checkpoints = tmp_path / "ckpt"
    step_checkpoints = ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=every_n_train_steps)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(
            default_root_dir=tmp_path / "crash", max_epochs=epochs, enable_checkpointing=True,
            callbacks=[_callback(tiny_data, **options), step_checkpoints, CrashAtStep(crash_at)],
        ).fit(TinyClassifier().double(), _resumable_loader(tiny_data))
    saved_step = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert saved_step == crash_at - crash_at % every_n_train_steps

    resumed = _callback(tiny_data, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no inexact-resume warning: this one is exact
        warnings.filterwarnings("ignore", module="lightning.*")
        trainer(default_root_dir=tmp_path / "resumed", max_epochs=epochs, callbacks=[resumed]).fit(
            TinyClassifier().double(), _resumable_loader(tiny_data), ckpt_path=checkpoints / "last.ckpt"
        )
    assert resumed.steps_recorded == reference.steps_recorded
    expected, actual = reference.influence, resumed.influence
    for name in expected:
        for component in ("first_order", "second_order", "diffin", "visits"):
            torch.testing.assert_close(actual[name].component(component), expected[name].component(component), rtol=1e-9, atol=1e-12)


def test_a_plain_loader_resumed_mid_epoch_warns_once(tmp_path, tiny_data):
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(
            default_root_dir=tmp_path, max_epochs=3, enable_checkpointing=True,
            callbacks=[_callback(tiny_data), ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=3), CrashAtStep(7)],
        ).fit(TinyClassifier().double(), tiny_data.loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(default_root_dir=tmp_path, max_epochs=3, callbacks=[_callback(tiny_data)]).fit(
            TinyClassifier().double(), tiny_data.loader(), ckpt_path=checkpoints / "last.ckpt"
        )
    ours = [w for w in caught if "DiffInCallback: resumed at step 6" in str(w.message)]
    assert len(ours) == 1 and "trained twice" in str(ours[0].message) and "ResumableDataLoader" in str(ours[0].message)


@pytest.mark.slow
def test_kill_loop(tmp_path):
    """At least 30 SIGKILLs at random points and on writes; every file loads after each; final scores equal.

    Took 262 s on 2 shared CPU cores (38 kills over 6 runs, 17 of them mid-write; README, "Faults and resume").
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).parent / "kill_loop.py"
    finished = subprocess.run([sys.executable, str(script), str(tmp_path), "--kills", "30", "--seed", "0"], capture_output=True, text=True, env=env, timeout=3000)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))  # the figures the README quotes
    kills = report["kills"]
    assert len(kills) >= 30
    assert all(kill["loadable"] for kill in kills), [kill for kill in kills if not kill["loadable"]]
    assert any(kill["writing_at_kill"] or kill["pending_metadata_at_kill"] for kill in kills), "no kill landed mid-write"
    # Resumes from both kinds: step checkpoints (every 7 steps) and the epoch-end one at step 15, the newest
    # from step 15 to 20 (a quarter of the run).
    kinds = {kill["newest_checkpoint"].split("-")[1] for kill in kills if kill["newest_checkpoint"]}
    assert kinds == {"step.ckpt", "epoch.ckpt"}, kinds
    for lineage in report["lineages"]:
        assert lineage["final_exit"] == 0 and lineage["temporaries_left"] == []
        assert lineage["comparison"]["allclose"], lineage


def test_resume_from_a_checkpoint_after_the_last_step_finishes_the_files(tmp_path, tiny_data):
    # A kill after the last checkpoint but before the end-of-fit drift pass and write: Lightning's resume
    # finds nothing left to train and skips the training loop; the callback must still finish the files.
    checkpoints = tmp_path / "ckpt"
    first = _callback(tiny_data)
    trainer(
        default_root_dir=tmp_path / "a", max_epochs=2, enable_checkpointing=True,
        callbacks=[first, ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=4)],
    ).fit(TinyClassifier().double(), _resumable_loader(tiny_data))
    again = _callback(tiny_data)
    trainer(default_root_dir=tmp_path / "b", max_epochs=2, callbacks=[again]).fit(
        TinyClassifier().double(), _resumable_loader(tiny_data), ckpt_path=checkpoints / "last.ckpt"
    )
    finished = load_influence(tmp_path / "b")
    assert finished.metadata["complete"] is True and finished.metadata["propagated_drift_included"] is True
    for name in first.influence:
        torch.testing.assert_close(finished[name].diffin, first.influence[name].diffin, rtol=1e-9, atol=1e-12)


def test_resuming_a_dropout_model_warns_that_its_masks_differ(tmp_path, tiny_data):
    # Lightning's checkpoint holds no global random state: after a resume dropout draws other masks.
    from test_callback_side_effects import DropoutClassifier

    checkpoints = tmp_path / "ckpt"
    trainer(
        default_root_dir=tmp_path, max_epochs=1, enable_checkpointing=True,
        callbacks=[_callback(tiny_data), ModelCheckpoint(dirpath=checkpoints, save_last=True)],
    ).fit(DropoutClassifier().double(), _resumable_loader(tiny_data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[_callback(tiny_data)]).fit(
            DropoutClassifier().double(), _resumable_loader(tiny_data), ckpt_path=checkpoints / "last.ckpt"
        )
    ours = [w for w in caught if "draws random numbers in training" in str(w.message)]
    assert len(ours) == 1 and "net.2 (Dropout, p=0.4)" in str(ours[0].message)
