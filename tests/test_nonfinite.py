"""Non-finite values: skipped where they arise, counted, and never reach a running sum or a saved score."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from diffin_lightning import DiffInCallback, load_influence
from helpers import TinyClassifier, trainer

COMPONENTS = ("first_order", "second_order", "diffin", "visits")


def _nan_gradient(logits, mask):
    """The same values; the masked rows' gradient becomes NaN (d sqrt(u)/du at u = 0 times du/dlogits = 0).

    Plain tensor ops, so it works under autograd, vmap and jvp alike.
    """
    rows = mask[:, None]
    inside = torch.where(rows, logits * 0.0, torch.ones_like(logits))
    return logits + torch.sqrt(inside) - torch.where(rows, 0.0, 1.0)


class FaultyClassifier(TinyClassifier):
    """Injects NaN losses or NaN gradients for chosen (step, sample id) pairs.

    Training stays alive the way careful users keep it alive: the training loss averages
    the finite per-sample losses, and non-finite gradient entries are zeroed before the step.
    """

    def __init__(self, nan_loss: dict[int, list[int]] | None = None, nan_gradient: dict[int, list[int]] | None = None) -> None:
        super().__init__()
        self.nan_loss, self.nan_gradient = nan_loss or {}, nan_gradient or {}

    def _mask(self, faults, batch):
        return torch.isin(batch["index"], torch.tensor(faults.get(self.global_step, []), dtype=torch.long))

    def per_sample_loss(self, batch):
        logits = self(batch["input"])
        if self.nan_gradient:
            logits = _nan_gradient(logits, self._mask(self.nan_gradient, batch))
        losses = torch.nn.functional.cross_entropy(logits, batch["target"], reduction="none")
        if self.nan_loss:
            losses = losses * torch.where(self._mask(self.nan_loss, batch), float("nan"), 1.0)
        return losses

    def training_step(self, batch, batch_idx):
        losses = self.per_sample_loss(batch)
        return losses[torch.isfinite(losses)].mean()

    def on_before_optimizer_step(self, optimizer):
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class InfLearningRate(Callback):
    """Sets every learning rate to inf at step 5 (the update then makes the model non-finite)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = math.inf


def _callback(tiny_data, tmp_path):
    return DiffInCallback(targets={"val": tiny_data.val, "train": "train", "self": "self"}, eps=1e-6, output_dir=tmp_path / "scores")


def _faults_in_batches(tiny_data, steps, per_step):
    """(step -> ids) that lie in the batch each step actually draws (4 steps per epoch, order from the sampler)."""
    sampler = tiny_data.loader().sampler
    faults = {}
    for step in steps:
        epoch, position = divmod(step, 4)
        faults[step] = sampler.order(epoch)[position * 4 : position * 4 + per_step]
    return faults


def _assert_all_finite(result):
    for name in result:
        for component in COMPONENTS:
            assert torch.isfinite(result[name].component(component)).all(), (name, component)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "norm-clipped"])
@pytest.mark.parametrize("fault", ["nan_loss", "nan_gradient"])
def test_nan_losses_and_gradients_are_skipped_and_counted(tmp_path, tiny_data, fault, clip):
    # Under norm clipping a non-finite .grad has a non-finite norm: the step must still be skipped as a non-finite
    # G_B (not as a non-finite learning rate, which would end the scoring).
    faults = _faults_in_batches(tiny_data, steps=[1, 4, 6], per_step=2)  # 3 steps, 2 bad samples each
    callback = _callback(tiny_data, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(default_root_dir=tmp_path, max_epochs=2, gradient_clip_val=clip, callbacks=[callback]).fit(
            FaultyClassifier(**{fault: faults}).double(), tiny_data.loader()
        )
    assert not [str(w.message) for w in caught if "the learning rate (" in str(w.message)]
    result = load_influence(tmp_path / "scores")
    _assert_all_finite(result)
    meta = result.metadata
    # G_B is the mean over the batch: one bad sample makes it non-finite, so the step is skipped for the
    # targets that need it; the 'self' target needs only each sample's own gradient and skips the bad samples.
    assert meta["nonfinite_steps_skipped"] == {"val": 3, "train": 3}
    assert meta["nonfinite_samples_skipped"] == {"self": 6}
    assert meta["complete"] is True and meta["model_nonfinite_step"] is None and meta["propagated_drift_included"] is True
    visits = result["val"].visits
    assert visits.sum() == 4 * (8 - 3)  # 8 steps of 4 samples, 3 steps skipped
    assert result["self"].visits.sum() == 4 * 8 - 6
    bad = torch.tensor(sorted({i for ids in faults.values() for i in ids}))
    assert len(bad) == 6  # six distinct samples: none faulted in both epochs
    assert (result["self"].visits[bad] == 1).all()  # each visited twice in 2 epochs, once with a fault


def test_an_inf_learning_rate_ends_scoring_and_says_why(tmp_path, tiny_data):
    callback = _callback(tiny_data, tmp_path)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[InfLearningRate(), callback]).fit(TinyClassifier().double(), tiny_data.loader())
    result = load_influence(tmp_path / "scores")
    _assert_all_finite(result)
    meta = result.metadata
    assert meta["complete"] is False and "non-finite at step 6" in meta["incomplete_reason"]
    assert meta["model_nonfinite_step"] == 6
    # Step 5 (inf learning rate) and steps 6, 7 (non-finite model) are skipped for every target.
    assert meta["nonfinite_steps_skipped"] == {"val": 3, "train": 3, "self": 3}
    assert meta["propagated_drift_included"] is False

    # Nothing before the fault was lost: the first five steps' scores equal a run that stops there.
    reference = _callback(tiny_data, tmp_path / "reference")
    trainer(default_root_dir=tmp_path / "reference", max_steps=5, callbacks=[reference]).fit(TinyClassifier().double(), tiny_data.loader())
    expected = reference.influence_with("sum")  # the plain sum over steps: no normalization by the step count
    actual = callback.influence_with("sum")
    for name in expected:
        for component in ("first_order", "second_order", "visits"):
            torch.testing.assert_close(actual[name].component(component), expected[name].component(component), rtol=1e-9, atol=1e-12)


def test_the_propagated_history_survives_a_nan_curvature(tmp_path, tiny_data, monkeypatch):
    """The issue's case: a NaN curvature at one step used to clamp the propagation factor to 0 and wipe all history.

    The NaN is put into the curvature where the step computes it (the losses stay finite, so no gate skips the step
    first); the real factor is formed from it.
    """
    from diffin_lightning import step as step_module

    original = step_module.bracket_and_curvature
    at: dict[str, int] = {}
    after: dict[str, dict[str, torch.Tensor]] = {}

    def nan_curvature_at_step_six(*args, **kwargs):
        bracket, curvature = original(*args, **kwargs)
        return bracket, curvature * float("nan") if at.get("step") == 6 else curvature

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            at["step"] = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if at["step"] == 6:
                after.update({name: {k: v.clone() for k, v in sums.items()} for name, sums in faulty._sums.items()})

    monkeypatch.setattr(step_module, "bracket_and_curvature", nan_curvature_at_step_six)
    faulty, clean = _callback(tiny_data, tmp_path / "a"), _callback(tiny_data, tmp_path / "b")
    trainer(default_root_dir=tmp_path / "b", max_steps=6, callbacks=[clean]).fit(TinyClassifier().double(), tiny_data.loader())
    with pytest.warns(UserWarning, match="curvature along g_V .* non-finite at 1 recorded step"):
        trainer(default_root_dir=tmp_path / "a", max_epochs=2, callbacks=[Watch(), faulty]).fit(TinyClassifier().double(), tiny_data.loader())
    assert faulty.nonfinite_steps_skipped == {"val": 1, "train": 1}
    # Step 6 carried every state of the targets with a factor unchanged: as they stood after steps 0-5.
    for name in ("val", "train"):
        for key, value in clean._sums[name].items():
            torch.testing.assert_close(after[name][key], value, rtol=1e-9, atol=1e-12)
    decayed_before = clean._sums["val"]["decayed_first"]
    # The history up to step 6 was carried on, not zeroed: the samples seen only before step 6 keep a
    # non-zero decayed first-order sum.
    seen_before = clean.influence["val"].visits > 0
    assert (faulty._sums["val"]["decayed_first"][seen_before] != 0).all()
    assert decayed_before.abs().sum() > 0
    _assert_all_finite(faulty.influence)


def test_the_checkpoint_schedule_skips_non_finite_checkpoints_for_every_target(tmp_path, tiny_data):
    # 8 steps, 4 checkpoints at steps 1, 3, 5, 7: step 5 has an inf learning rate, step 7 a non-finite model.
    callback = DiffInCallback(
        targets={"val": tiny_data.val, "train": "train", "self": "self"}, schedule="checkpoints", num_checkpoints=4,
        eps=1e-6, output_dir=tmp_path / "scores",
    )
    with pytest.warns(UserWarning, match="non-finite"):
        trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[InfLearningRate(), callback]).fit(TinyClassifier().double(), tiny_data.loader())
    result = load_influence(tmp_path / "scores")
    _assert_all_finite(result)
    meta = result.metadata
    assert meta["checkpoint_steps"] == [1, 3, 5, 7]
    assert meta["nonfinite_steps_skipped"] == {"val": 2, "train": 2, "self": 2}
    assert meta["model_nonfinite_step"] == 7 and meta["complete"] is False
    assert (result["val"].visits == 2).all()  # every sample scored at the two finite checkpoints, nothing after


def test_a_non_finite_propagation_factor_skips_that_step_for_its_target_on_the_device(tmp_path, tiny_data, monkeypatch):
    """The factor's finiteness is never read back per step: the accumulator skips the step, counts it, warns at the end."""
    from diffin_lightning import step as step_module
    from helpers import TrajectoryRecorder

    original = step_module.propagation_factor
    calls = []

    def factor_nan_at_step_three(eta, curvature, steps):
        calls.append(None)
        value = original(eta, curvature, steps)
        return value * float("nan") if len(calls) == 4 else value  # the 4th recorded step (global step 3)

    monkeypatch.setattr(step_module, "propagation_factor", factor_nan_at_step_three)
    recorder = TrajectoryRecorder()
    callback = DiffInCallback(targets={"val": tiny_data.val, "self": "self"}, output_dir=tmp_path / "out")
    with pytest.warns(UserWarning, match="curvature along g_V .* non-finite at 1 recorded step"):
        trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[recorder, callback]).fit(TinyClassifier().double(), tiny_data.loader())
    val, own = callback.influence["val"], callback.influence["self"]
    skipped_ids = torch.tensor(recorder.steps[3].ids)
    expected_visits = own.visits.clone()
    expected_visits[skipped_ids] -= 1
    assert torch.equal(val.visits, expected_visits)
    assert callback.nonfinite_steps_skipped == {"val": 1}
    assert callback.nonfinite_samples_skipped == {}
    assert load_influence(tmp_path / "out").metadata["nonfinite_steps_skipped"] == {"val": 1}
    # The history before the skipped step is carried, not wiped.
    seen_before = torch.zeros_like(own.visits, dtype=torch.bool)
    for earlier in recorder.steps[:3]:
        seen_before[torch.tensor(earlier.ids)] = True
    assert (callback._sums["val"]["decayed_first"][seen_before] != 0).all()
    _assert_all_finite(callback.influence)


def test_the_train_targets_average_leaves_out_a_gated_fold():
    """The 'train' target folds G_B into its average under the device gate: a non-finite G_B is left out (the average
    and the bias correction's count as if the step had been skipped on the host), and no flag is read back."""
    from diffin_lightning.targets import TrainingLossTarget

    generator = torch.Generator().manual_seed(0)
    good = [{"w": torch.randn(3, generator=generator, dtype=torch.float64)} for _ in range(3)]
    bad = {"w": torch.tensor([float("nan"), 1.0, float("inf")], dtype=torch.float64)}
    gated, skipped = TrainingLossTarget(decay=0.5), TrainingLossTarget(decay=0.5)
    cpu = torch.device("cpu")
    gated.target_gradient(None, {}, 0, cpu, bad, usable=torch.tensor(False))  # gated before any fold: the estimate is zero
    torch.testing.assert_close(gated.current_estimate()["w"], torch.zeros(3, dtype=torch.float64))
    for step, batch_gradient in enumerate([good[0], bad, good[1], good[2]]):
        usable = torch.tensor(batch_gradient is not bad)
        estimate = gated.target_gradient(None, {}, step, cpu, batch_gradient, usable=usable)
        if batch_gradient is not bad:
            expected = skipped.target_gradient(None, {}, step, cpu, batch_gradient)
            torch.testing.assert_close(estimate["w"], expected["w"], rtol=1e-15, atol=0)
    assert int(gated.updates) == skipped.updates == 3
    assert gated.state_dict()["updates"] == 3


class PoisonedTargetPass(TinyClassifier):
    """NaN losses for the target's samples (known by their inputs) at chosen steps: its refreshes then, nothing else."""

    def __init__(self, poisoned_steps: set[int], target_inputs: torch.Tensor) -> None:
        super().__init__()
        self.poisoned_steps = poisoned_steps
        self.register_buffer("target_marks", target_inputs[:, 0].clone())

    def per_sample_loss(self, batch):
        losses = super().per_sample_loss(batch)
        if self.global_step in self.poisoned_steps:
            # (times NaN, not replaced by it: the gradient must be NaN too)
            losses = losses * torch.where(torch.isin(batch["input"][:, 0], self.target_marks), float("nan"), 1.0)
        return losses


@pytest.mark.parametrize("path", ["device gates", "host checks"])
def test_a_non_finite_target_refresh_skips_its_steps_and_leaves_no_slope(tmp_path, tiny_data, path):
    """A refresh whose g_V is non-finite. Under the device gates (the default) nothing is read back: the target's
    steps are gated until its next refresh (steps 2 and 3 of a refresh every 2 steps), and the change across the bad
    refresh gives the extrapolation no slope (a NaN one would poison the next interval too). Checked on the host
    (micro-batches of unequal sizes: the step is recomputed), the step is skipped and the target refreshed again at
    the next step."""
    gated = path == "device gates"
    # Host checks: batches of 6, 6, 4 accumulated into one step an epoch.
    loader, fit = (tiny_data.loader(), dict(max_epochs=2)) if gated else (tiny_data.loader(batch_size=6), dict(max_epochs=8, accumulate_grad_batches=3))
    settings = dict(targets={"val": tiny_data.val, "self": "self"}, target_refresh_every_n_steps=2, target_extrapolation="damped")
    poisoned = DiffInCallback(output_dir=tmp_path / "a", **settings)
    clean = DiffInCallback(output_dir=tmp_path / "b", **settings)

    class Slopes(Callback):
        """Whether the target's slope is finite after each step (None before the second refresh)."""

        def __init__(self):
            self.finite: list[bool | None] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            slope = poisoned._recorder.targets[0].slope
            self.finite.append(None if slope is None else all(bool(torch.isfinite(s).all()) for s in slope.values()))

    slopes = Slopes()
    marks = tiny_data.val.tensors[0]
    with pytest.warns(UserWarning, match="non-finite"):
        trainer(default_root_dir=tmp_path / "a", callbacks=[poisoned, slopes], **fit).fit(PoisonedTargetPass({2}, marks).double(), loader)
    trainer(default_root_dir=tmp_path / "b", callbacks=[clean], **fit).fit(PoisonedTargetPass(set(), marks).double(), loader)
    result = load_influence(tmp_path / "a")
    _assert_all_finite(result)
    skipped = 2 if gated else 1
    assert result.metadata["nonfinite_steps_skipped"] == {"val": skipped}
    samples_per_step = 4 if gated else 16
    assert result["val"].visits.sum() == result["self"].visits.sum() - samples_per_step * skipped
    # Nothing non-finite leaked into the per-sample sums or the end-of-fit drift (NaN * 0 in a gated step's g_V).
    assert result.metadata["nonfinite_samples_skipped"] == {}
    assert all(finite in (None, True) for finite in slopes.finite), slopes.finite
    torch.testing.assert_close(result["self"].diffin, load_influence(tmp_path / "b")["self"].diffin)  # training untouched
