"""The trajectory log: what it records matches the run step by step, it is plain safetensors + JSON,
and a fit crashed and resumed from a Lightning checkpoint continues the same log."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from diffin_lightning import TrajectoryLog, TrajectoryLogError, trajectory_influence
from diffin_lightning.trajectory import INDEX_FILE, checkpoint_file, read_segment
from helpers import TinyClassifier, TrajectoryRecorder, trainer


def _read_log(directory):
    index = json.loads((directory / INDEX_FILE).read_text())
    segments = [read_segment(directory, s, index["run_id"]) for s in index["segments"]]
    return index, segments


def test_the_log_records_every_step_and_the_checkpoints_of_the_run(tmp_path, tiny_data):
    recorder = TrajectoryRecorder()
    model = TinyClassifier().double()
    log = TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=3)
    trainer(max_epochs=3, callbacks=[recorder, log]).fit(model, tiny_data.loader())
    index, segments = _read_log(tmp_path / "log")
    assert index["complete"] and index["final_step"] == 12 and index["checkpoints"] == [0, 3, 6, 9]
    assert [s["start"] for s in index["segments"]] == [0, 3, 6, 9]
    steps = [step for segment in segments for step in segment.steps.tolist()]
    ids = [torch.cat(list(micro)).tolist() for segment in segments for micro in segment.ids]
    lrs = [float(lr) for segment in segments for lr in segment.lr[:, 0]]
    assert steps == [r.step for r in recorder.steps]
    assert ids == [r.ids for r in recorder.steps]
    assert lrs == [r.lr for r in recorder.steps]
    for step in index["checkpoints"]:
        saved = load_file(tmp_path / "log" / checkpoint_file(step))
        assert all(torch.equal(saved[f"param/{n}"], recorder.steps[step].params[n]) for n in recorder.steps[step].params)
        assert saved["rng/cpu"].dtype == torch.uint8
    final = load_file(tmp_path / "log" / "final.safetensors")
    assert all(torch.equal(final[f"param/{n}"], p.detach()) for n, p in model.named_parameters())
    # Nothing that unpickles: only safetensors and JSON.
    assert {p.suffix for p in (tmp_path / "log").iterdir()} == {".safetensors", ".json"}
    assert index["fingerprint"] is not None and index["optimizer"]["class"] == "SGD"


def test_auto_interval_keeps_two_checkpoints_and_the_final_parameters(tmp_path, tiny_data):
    trainer(max_epochs=5, callbacks=[TrajectoryLog(output_dir=tmp_path / "log")]).fit(TinyClassifier().double(), tiny_data.loader())
    index = json.loads((tmp_path / "log" / INDEX_FILE).read_text())
    assert index["checkpoint_every_n_steps"] == 10 and index["checkpoints"] == [0, 10] and index["final_step"] == 20


def test_a_step_that_amps_scaler_skips_is_logged_as_skipped(tmp_path, tiny_data):
    from lightning.pytorch.plugins import MixedPrecision

    from test_callback_errors import _float32

    # Step 1's gradients are infinite: the scaler skips that step (and only that one).
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    log = TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=2)
    trainer(max_epochs=1, callbacks=[log], precision=None, plugins=[precision]).fit(TinyClassifier(blow_up_at_step=1), _float32(tiny_data.loader()))
    _, segments = _read_log(tmp_path / "log")
    assert [bool(s) for segment in segments for s in segment.skipped] == [False, True, False, False]
    assert [float(c) for segment in segments for c in segment.clip] == [1.0, 1.0, 1.0, 1.0]


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_crash_and_resume_continues_the_same_log(tmp_path, tiny_data):
    epochs = 4  # 4 steps per epoch; K=3 puts segment boundaries inside epochs
    reference_model = TinyClassifier().double()
    trainer(max_epochs=epochs, callbacks=[TrajectoryLog(output_dir=tmp_path / "full", checkpoint_every_n_steps=3)]).fit(reference_model, tiny_data.loader())

    checkpoints = tmp_path / "ckpt"
    crashing = trainer(
        max_epochs=epochs,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        # Lightning checkpoint at the end of epoch 2 (step 8); the crash at step 10 comes after the log
        # wrote segment 6..8 and checkpoint 9: the resumed fit must drop those and rewrite them.
        callbacks=[TrajectoryLog(output_dir=tmp_path / "resumed", checkpoint_every_n_steps=3), ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_epochs=1), CrashAtStep(10)],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(TinyClassifier().double(), tiny_data.loader())
    index = json.loads((tmp_path / "resumed" / INDEX_FILE).read_text())
    assert not index["complete"] and 9 in index["checkpoints"]
    with pytest.raises(TrajectoryLogError, match="did not finish"):
        trajectory_influence(TinyClassifier().double(), tmp_path / "resumed", tiny_data.train, {"val": tiny_data.val}, progress=False)

    resumed_model = TinyClassifier().double()
    trainer(max_epochs=epochs, enable_checkpointing=True, default_root_dir=tmp_path, callbacks=[TrajectoryLog(output_dir=tmp_path / "resumed", checkpoint_every_n_steps=3), ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_epochs=1)]).fit(
        resumed_model, tiny_data.loader(), ckpt_path=checkpoints / "last.ckpt"
    )
    full_index, full_segments = _read_log(tmp_path / "full")
    resumed_index, resumed_segments = _read_log(tmp_path / "resumed")
    assert resumed_index["complete"] and resumed_index["resumed_at_step"] == 8
    assert resumed_index["checkpoints"] == full_index["checkpoints"] and resumed_index["segments"] == full_index["segments"]
    for a, b in zip(full_segments, resumed_segments):
        assert torch.equal(a.steps, b.steps) and torch.equal(a.lr, b.lr)
        assert [torch.cat(list(m)).tolist() for m in a.ids] == [torch.cat(list(m)).tolist() for m in b.ids]
    for step in full_index["checkpoints"]:
        x, y = load_file(tmp_path / "full" / checkpoint_file(step)), load_file(tmp_path / "resumed" / checkpoint_file(step))
        assert all(torch.allclose(x[k], y[k], rtol=1e-12, atol=1e-14) for k in x if k.startswith("param/"))
    full = trajectory_influence(reference_model, tmp_path / "full", tiny_data.train, {"val": tiny_data.val}, progress=False)
    resumed = trajectory_influence(resumed_model, tmp_path / "resumed", tiny_data.train, {"val": tiny_data.val}, progress=False)
    assert torch.allclose(full["val"].diffin, resumed["val"].diffin, rtol=1e-10, atol=1e-14)


def test_a_new_fit_does_not_write_over_another_runs_log(tmp_path, tiny_data):
    trainer(max_epochs=1, callbacks=[TrajectoryLog(output_dir=tmp_path / "log")]).fit(TinyClassifier().double(), tiny_data.loader())
    before = (tmp_path / "log" / INDEX_FILE).read_bytes()
    with pytest.raises(TrajectoryLogError, match="already holds the log of another run"):
        trainer(max_epochs=1, callbacks=[TrajectoryLog(output_dir=tmp_path / "log")]).fit(TinyClassifier().double(), tiny_data.loader())
    assert (tmp_path / "log" / INDEX_FILE).read_bytes() == before


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_checkpoint_interval_is_refused(value):
    with pytest.raises(TrajectoryLogError, match="`checkpoint_every_n_steps` must be a positive int"):
        TrajectoryLog(checkpoint_every_n_steps=value)
