"""trajectory_influence against independent references: Hara et al.'s exact SGD-influence (the
fidelity harness, float64, exact HVPs along every recorded step), autograd through an unrolled
momentum-SGD loop, and leave-one-out retraining; plus the bad inputs it must refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import spearman_corrcoef

from benchmarks.fidelity import make_model
from benchmarks.harness import exact_sgd_influence, functional_cross_entropy
from diffin_lightning import TrajectoryLog, TrajectoryLogError, load_influence, trajectory_influence
from diffin_lightning.bundled import DigitsDataModule
from helpers import TinyClassifier, TinyData, TrajectoryRecorder, trainer

RTOL_FLOAT64 = 1e-6
RTOL_FLOAT32 = 1e-3


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _fit_digits(kind: str, tmp_path: Path, double: bool, epochs: int, intervals: dict[str, int]):
    datamodule = DigitsDataModule(batch_size=64, double=double, image=kind == "cnn")
    model = make_model(kind, datamodule, lr=0.3)
    if double:
        model = model.double()
    recorder = TrajectoryRecorder()
    logs = {name: TrajectoryLog(output_dir=tmp_path / name, checkpoint_every_n_steps=k) for name, k in intervals.items()}
    trainer(max_epochs=epochs, precision="64-true" if double else "32-true", callbacks=[recorder, *logs.values()], limit_val_batches=0).fit(
        model, datamodule=datamodule
    )
    return datamodule, model, recorder


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float64_replay_equals_exact_sgd_influence_for_every_checkpoint_interval(tmp_path, kind):
    # 2 epochs of 17 steps: K=1 (a checkpoint per step), K=10 (4 segments, the last partial), K=whole run.
    datamodule, model, recorder = _fit_digits(kind, tmp_path, True, 2, {"k1": 1, "k10": 10, "whole": 10_000})
    train, val = datamodule.train_dataset.dataset.tensors, datamodule.val_dataset.tensors
    reference = exact_sgd_influence(functional_cross_entropy(model), recorder.steps, recorder.final, train, val)
    assert float(reference.abs().max()) > 0
    for name in ("k1", "k10", "whole"):
        result = trajectory_influence(model, tmp_path / name, datamodule.train_dataset, {"val": datamodule.val_dataset}, progress=False)
        assert relative(result["val"].diffin, reference) < RTOL_FLOAT64, name
        assert result.metadata["replay_drift_max"] < 1e-12
    exact = trajectory_influence(model, tmp_path / "k10", datamodule.train_dataset, {"val": datamodule.val_dataset}, hvp="exact", progress=False)
    assert relative(exact["val"].diffin, reference) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float32_central_differences_within_1e_3_of_the_float64_reference(tmp_path, kind):
    datamodule, model, recorder = _fit_digits(kind, tmp_path, False, 2, {"k10": 10})
    train = tuple(t.double() if t.is_floating_point() else t for t in datamodule.train_dataset.dataset.tensors)
    val = tuple(t.double() if t.is_floating_point() else t for t in datamodule.val_dataset.tensors)
    for record in recorder.steps:
        record.params = {n: p.double() for n, p in record.params.items()}
    final = {n: p.double() for n, p in recorder.final.items()}
    # The reference: float64 exact SGD-influence along the float32 run's own trajectory.
    import copy

    reference = exact_sgd_influence(functional_cross_entropy(copy.deepcopy(model).double()), recorder.steps, final, train, val)
    result = trajectory_influence(model, tmp_path / "k10", datamodule.train_dataset, {"val": datamodule.val_dataset}, progress=False)
    error = relative(result["val"].diffin, reference)
    assert error < RTOL_FLOAT32, error
    assert result.metadata["replay_drift_max"] < 1e-4


def test_several_targets_at_once_equal_one_at_a_time(tmp_path, tiny_data):
    model = TinyClassifier().double()
    trainer(max_epochs=3, callbacks=[TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=4)]).fit(model, tiny_data.loader())
    first, second = torch.utils.data.Subset(tiny_data.val, [0, 1]), [tiny_data.val[i] for i in (2, 3, 4)]
    together = trajectory_influence(model, tmp_path / "log", tiny_data.train, {"a": first, "b": second}, progress=False)
    alone = trajectory_influence(model, tmp_path / "log", tiny_data.train, {"b": second}, progress=False)
    assert torch.equal(together["b"].diffin, alone["b"].diffin)
    assert not torch.allclose(together["a"].diffin, together["b"].diffin)
    assert together.metadata["schedule"] == "replay"
    assert int(together["a"].visits.sum()) == 3 * 16  # every sample once per epoch


def test_written_result_loads_like_the_callbacks_files(tmp_path, tiny_data):
    from diffin_lightning import IndexedDataset

    model = TinyClassifier().double()
    trainer(max_epochs=2, callbacks=[TrajectoryLog(output_dir=tmp_path / "log")]).fit(model, tiny_data.loader())
    result = trajectory_influence(model, tmp_path / "log", tiny_data.train, {"val": tiny_data.val}, output_dir=tmp_path / "out", progress=False)
    loaded = load_influence(tmp_path / "out", dataset=IndexedDataset(tiny_data.train))
    assert loaded.metadata["schedule"] == "replay"
    assert torch.equal(loaded["val"].diffin, result["val"].diffin)


# ---------------------------------------------------------------------- optimizers and training features


class MomentumClassifier(TinyClassifier):
    def __init__(self, nesterov: bool = False, dropout: float = 0.0, clip_test: bool = False) -> None:
        super().__init__(lr=0.05)
        self.nesterov = nesterov
        if dropout:
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(dropout), nn.Linear(4, 3))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, dampening=0.1 if not self.nesterov else 0.0, weight_decay=1e-2, nesterov=self.nesterov)


def _unrolled_momentum(
    model: nn.Module, steps, weights: torch.Tensor, data: TinyData, nesterov: bool, create_graph: bool = True, clip: float | None = None
):
    """L_V after an unrolled torch.optim.SGD(momentum=0.9, weight_decay=1e-2) run with per-sample loss weights.

    ``clip``: Lightning's norm clipping before each step (torch.nn.utils.clip_grad_norm_'s factor,
    differentiated like everything else).
    """
    x, y = data.train.tensors
    params = {n: p.clone().requires_grad_(True) for n, p in steps[0].params.items()}
    velocity: dict[str, torch.Tensor] = {}
    damp = 0.0 if nesterov else 0.1
    for record in steps:
        ids = torch.tensor(record.ids)
        losses = F.cross_entropy(torch.func.functional_call(model, params, (x[ids],)), y[ids], reduction="none")
        gradient = torch.autograd.grad((weights[ids] * losses).sum() / len(ids), list(params.values()), create_graph=create_graph)
        if clip is not None:
            total = torch.sqrt(sum((g**2).sum() for g in gradient))
            gradient = [g * torch.clamp(clip / (total + 1e-6), max=1.0) for g in gradient]
        new = {}
        for (name, theta), g in zip(params.items(), gradient):
            d = g + 1e-2 * theta
            velocity[name] = d if name not in velocity else 0.9 * velocity[name] + (1 - damp) * d
            step = d + 0.9 * velocity[name] if nesterov else velocity[name]
            new[name] = theta - record.lr * step
        params = new
    vx, vy = data.val.tensors
    return F.cross_entropy(torch.func.functional_call(model, params, (vx,)), vy).mean(), params


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_and_weight_decay_adjoint_against_unrolled_autograd_and_leave_one_out(tmp_path, nesterov):
    data = TinyData.make(num_train=32, num_val=8, seed=2)
    model = MomentumClassifier(nesterov=nesterov).double()
    recorder = TrajectoryRecorder()
    trainer(max_epochs=4, callbacks=[recorder, TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=7)]).fit(model, data.loader())
    # The unrolled loop is torch.optim.SGD: it lands where Lightning's run landed.
    weights = torch.ones(32, dtype=torch.float64, requires_grad=True)
    loss, final = _unrolled_momentum(model, recorder.steps, weights, data, nesterov)
    assert all(torch.allclose(final[n], recorder.final[n], rtol=1e-10, atol=1e-12) for n in final)
    # Removing i sets w_i from 1 to 0: to first order the loss moves by -dL/dw_i.
    reference = -torch.autograd.grad(loss, weights)[0]
    for hvp in ("exact", "central"):
        result = trajectory_influence(model, tmp_path / "log", data.train, {"val": data.val}, hvp=hvp, progress=False)
        assert relative(result["val"].diffin, reference) < RTOL_FLOAT64, hvp
    with torch.no_grad():
        base = _unrolled_momentum_no_grad(model, recorder, data, nesterov, None)
        truth = torch.stack([_unrolled_momentum_no_grad(model, recorder, data, nesterov, j) - base for j in range(32)])
    ceiling = float(spearman_corrcoef(reference.detach(), truth))
    replayed = float(spearman_corrcoef(result["val"].diffin, truth))
    assert ceiling > 0.9
    assert replayed >= ceiling - 0.02


def _unrolled_momentum_no_grad(model, recorder, data, nesterov, left_out, clip=None):
    weights = torch.ones(32, dtype=torch.float64)
    if left_out is not None:
        weights[left_out] = 0.0
    with torch.enable_grad():
        loss, _ = _unrolled_momentum(model, recorder.steps, weights, data, nesterov, create_graph=False, clip=clip)
    return loss.detach()


@pytest.mark.parametrize("hvp", ["exact", "central"])
def test_norm_clipping_is_differentiated_against_unrolled_autograd_and_leave_one_out(tmp_path, hvp):
    """Clipped and unclipped steps, momentum and weight decay: the replay is the derivative of the clipped run."""
    data = TinyData.make(num_train=32, num_val=8, seed=2)
    model = MomentumClassifier(nesterov=False).double()
    recorder = TrajectoryRecorder()
    clip = 0.7
    trainer(max_epochs=4, gradient_clip_val=clip, callbacks=[recorder, TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=7)]).fit(
        model, data.loader()
    )
    weights = torch.ones(32, dtype=torch.float64, requires_grad=True)
    loss, final = _unrolled_momentum(model, recorder.steps, weights, data, False, clip=clip)
    assert all(torch.allclose(final[n], recorder.final[n], rtol=1e-10, atol=1e-12) for n in final)  # clipped as Lightning clipped
    reference = -torch.autograd.grad(loss, weights)[0]
    result = trajectory_influence(model, tmp_path / "log", data.train, {"val": data.val}, hvp=hvp, progress=False)
    factors = _logged_clip_factors(tmp_path / "log")
    assert 0 < int((factors < 1).sum()) < len(factors)  # some steps clipped, some not
    assert relative(result["val"].diffin, reference) < RTOL_FLOAT64
    with torch.no_grad():
        base = _unrolled_momentum_no_grad(model, recorder, data, False, None, clip)
        truth = torch.stack([_unrolled_momentum_no_grad(model, recorder, data, False, j, clip) - base for j in range(32)])
    assert float(spearman_corrcoef(result["val"].diffin, truth)) > 0.9


def _logged_clip_factors(log_dir: Path) -> torch.Tensor:
    import json

    from diffin_lightning.trajectory import read_segment

    index = json.loads((log_dir / "trajectory.json").read_text())
    return torch.cat([read_segment(log_dir, s, index["run_id"]).clip for s in index["segments"]])


def test_dropout_replay_draws_the_runs_masks(tmp_path):
    data = TinyData.make(num_train=16, num_val=6, seed=0)
    for record_rng in (True, False):
        model = MomentumClassifier(dropout=0.3).double()
        trainer(max_epochs=2, callbacks=[TrajectoryLog(output_dir=tmp_path / str(record_rng), checkpoint_every_n_steps=100, record_rng=record_rng)]).fit(model, data.loader())
        if record_rng:
            result = trajectory_influence(model, tmp_path / "True", data.train, {"val": data.val}, progress=False)
            assert result.metadata["replay_drift_max"] < 1e-12  # the same masks, so the same path
        else:
            with pytest.warns(UserWarning, match="replay_tolerance"):
                result = trajectory_influence(model, tmp_path / "False", data.train, {"val": data.val}, progress=False)
            assert result.metadata["replay_drift_max"] > 1e-6  # other masks: the replay leaves the run's path


def test_gradient_accumulation_and_norm_clipping_replay_the_run(tmp_path, tiny_data):
    recorder = TrajectoryRecorder()
    model = TinyClassifier(lr=1.0).double()
    clip = 0.05
    trainer(max_epochs=3, accumulate_grad_batches=2, gradient_clip_val=clip, callbacks=[recorder, TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=2)]).fit(
        model, tiny_data.loader()
    )
    result = trajectory_influence(model, tmp_path / "log", tiny_data.train, {"val": tiny_data.val}, progress=False)
    assert result.metadata["replay_drift_max"] < 1e-12  # accumulation's 1/A and the clipping factor are replayed
    assert float(_logged_clip_factors(tmp_path / "log").min()) < 1.0  # clipping was active
    # The reference: autograd through the unrolled run, both micro-batches of a step in one clipped gradient.
    loss = functional_cross_entropy(model)
    (x, y), (vx, vy) = tiny_data.train.tensors, tiny_data.val.tensors
    weights = torch.ones(len(y), dtype=torch.float64, requires_grad=True)
    params = {n: p.clone().requires_grad_(True) for n, p in recorder.steps[0].params.items()}
    for record in recorder.steps:
        ids = torch.tensor(record.ids)
        gradient = torch.autograd.grad((weights[ids] * loss(params, x[ids], y[ids])).sum() / len(ids), list(params.values()), create_graph=True)
        factor = torch.clamp(clip / (torch.sqrt(sum((g**2).sum() for g in gradient)) + 1e-6), max=1.0)
        params = {n: p - record.lr * factor * g for (n, p), g in zip(params.items(), gradient)}
    assert all(torch.allclose(params[n], recorder.final[n], rtol=1e-10, atol=1e-12) for n in params)
    reference = -torch.autograd.grad(loss(params, vx, vy).mean(), weights)[0]
    assert relative(result["val"].diffin, reference) < RTOL_FLOAT64


# ---------------------------------------------------------------------- bad input: one clear error each, nothing written


@pytest.fixture
def recorded(tmp_path, tiny_data):
    model = TinyClassifier().double()
    trainer(max_epochs=2, callbacks=[TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=3)]).fit(model, tiny_data.loader())
    out = tmp_path / "out"
    trajectory_influence(model, tmp_path / "log", tiny_data.train, {"val": tiny_data.val}, output_dir=out, progress=False)
    return model, tmp_path / "log", out


def _unchanged(out: Path, before: dict[str, bytes]) -> bool:
    return {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_inputs_are_refused_with_one_clear_error_and_nothing_written(tmp_path, tiny_data, recorded):
    model, log, out = recorded
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def refuses(match: str, **kwargs) -> None:
        arguments = dict(module=model, log_dir=log, train_dataset=tiny_data.train, targets={"val": tiny_data.val}, output_dir=out, progress=False)
        arguments.update(kwargs)
        with pytest.raises(TrajectoryLogError, match=match):
            trajectory_influence(**arguments)
        assert _unchanged(out, before)

    other_data = TinyData.make(num_train=16, num_val=6, seed=5)
    refuses(r"`train_dataset` has fingerprint .* another data set", train_dataset=other_data.train)
    refuses(r"`module`'s parameters differ from the log's final parameters", module=TinyClassifier().double())
    refuses(r"`module`'s parameters do not match the log", module=TinyClassifier(hidden=6).double())
    refuses(r"`module`'s parameters do not match the log .*dtype", module=TinyClassifier())
    refuses(r"holds no trajectory log", log_dir=tmp_path)
    refuses(r"`hvp` must be one of", hvp="forward")
    refuses(r"`targets\['val'\]` must be a Dataset", targets={"val": 3})

    broken = tmp_path / "broken"
    shutil.copytree(log, broken)
    (broken / "steps-000000003.safetensors").unlink()
    refuses(r"is missing; the log is incomplete", log_dir=broken)
    import json

    index = json.loads((broken / "trajectory.json").read_text())
    index["segments"] = [s for s in index["segments"] if s["start"] != 3]
    (broken / "trajectory.json").write_text(json.dumps(index))
    refuses(r"no segment for steps 3\.\.5 \(missing segment\)", log_dir=broken)


class RMSpropClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=0.01)


def test_an_optimizer_the_replay_cannot_handle_is_refused_by_name(tmp_path, tiny_data):
    model = RMSpropClassifier().double()
    with pytest.warns(UserWarning, match="the optimizer is RMSprop; trajectory_influence replays torch.optim.SGD, Adam and AdamW only"):
        trainer(max_epochs=1, callbacks=[TrajectoryLog(output_dir=tmp_path / "log")]).fit(model, tiny_data.loader())
    with pytest.raises(TrajectoryLogError, match=r"optimizer torch\.optim\.rmsprop\.RMSprop, which the replay cannot handle: it supports torch\.optim\.SGD .*Adam and AdamW"):
        trajectory_influence(model, tmp_path / "log", tiny_data.train, {"val": tiny_data.val}, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


class AdamClassifier(TinyClassifier):
    def __init__(self, decoupled: bool) -> None:
        super().__init__(lr=0.02)
        self.decoupled = decoupled

    def configure_optimizers(self):
        if self.decoupled:
            return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.8, 0.95), weight_decay=0.1)
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.8, 0.95), weight_decay=1e-2)


def _unrolled_adam(model, steps, weights, data, decoupled, create_graph=True, clip=None):
    """L_V after an unrolled Adam / AdamW run (torch's formulas) with per-sample loss weights (norm-clipped by ``clip``)."""
    x, y = data.train.tensors
    params = {n: p.clone().requires_grad_(True) for n, p in steps[0].params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t, record in enumerate(steps, start=1):
        ids = torch.tensor(record.ids)
        losses = F.cross_entropy(torch.func.functional_call(model, params, (x[ids],)), y[ids], reduction="none")
        gradient = torch.autograd.grad((weights[ids] * losses).sum() / len(ids), list(params.values()), create_graph=create_graph)
        if clip is not None:
            total = torch.sqrt(sum((g**2).sum() for g in gradient))
            gradient = [g * torch.clamp(clip / (total + 1e-6), max=1.0) for g in gradient]
        new = {}
        for (name, theta), g in zip(params.items(), gradient):
            if decoupled:
                theta = theta * (1 - record.lr * 0.1)
            else:
                g = g + 1e-2 * theta
            m[name] = 0.8 * m[name] + 0.2 * g
            v[name] = 0.95 * v[name] + 0.05 * g * g
            denom = torch.sqrt(v[name]) / (1 - 0.95**t) ** 0.5 + 1e-8
            new[name] = theta - record.lr / (1 - 0.8**t) * m[name] / denom
        params = new
    vx, vy = data.val.tensors
    return F.cross_entropy(torch.func.functional_call(model, params, (vx,)), vy).mean(), params


@pytest.mark.parametrize(("decoupled", "clip"), [(False, None), (True, None), (True, 0.5)], ids=["adam", "adamw", "adamw-norm-clipped"])
def test_adam_and_adamw_adjoint_against_unrolled_autograd_and_leave_one_out(tmp_path, decoupled, clip):
    data = TinyData.make(num_train=32, num_val=8, seed=2)
    model = AdamClassifier(decoupled).double()
    recorder = TrajectoryRecorder()
    trainer(max_epochs=4, gradient_clip_val=clip, callbacks=[recorder, TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=7)]).fit(model, data.loader())
    if clip is not None:
        factors = _logged_clip_factors(tmp_path / "log")
        assert 0 < int((factors < 1).sum()) < len(factors), factors  # some steps clipped, some not
    weights = torch.ones(32, dtype=torch.float64, requires_grad=True)
    loss, final = _unrolled_adam(model, recorder.steps, weights, data, decoupled, clip=clip)
    assert all(torch.allclose(final[n], recorder.final[n], rtol=1e-10, atol=1e-12) for n in final)  # the loop is torch's Adam
    reference = -torch.autograd.grad(loss, weights)[0]
    for hvp in ("exact", "central"):
        result = trajectory_influence(model, tmp_path / "log", data.train, {"val": data.val}, hvp=hvp, progress=False)
        assert result.metadata["replay_drift_max"] < 1e-12
        assert relative(result["val"].diffin, reference) < RTOL_FLOAT64, hvp
    with torch.no_grad():
        def left_out(j):
            w = torch.ones(32, dtype=torch.float64)
            if j is not None:
                w[j] = 0.0
            with torch.enable_grad():
                return _unrolled_adam(model, recorder.steps, w, data, decoupled, create_graph=False, clip=clip)[0].detach()

        base = left_out(None)
        truth = torch.stack([left_out(j) - base for j in range(32)])
    ceiling = float(spearman_corrcoef(reference.detach(), truth))
    assert float(spearman_corrcoef(result["val"].diffin, truth)) >= ceiling - 0.02
    assert ceiling > 0.5, ceiling


def test_segments_longer_than_memory_allows_are_rechecked_inside(tmp_path, tiny_data):
    model = TinyClassifier().double()
    trainer(max_epochs=5, callbacks=[TrajectoryLog(output_dir=tmp_path / "log", checkpoint_every_n_steps=1000)]).fit(model, tiny_data.loader())
    one_level = trajectory_influence(model, tmp_path / "log", tiny_data.train, {"val": tiny_data.val}, progress=False)
    two_level = trajectory_influence(model, tmp_path / "log", tiny_data.train, {"val": tiny_data.val}, max_states_in_memory=4, progress=False)
    assert torch.equal(one_level["val"].diffin, two_level["val"].diffin)


def test_replay_dot_products_come_from_the_callbacks_layer_engine_with_the_fallback_for_the_rest():
    # A covered Linear plus a raw parameter no rule covers: captured factors + functional fallback
    # must equal the per-sample torch.func products, in float64.
    from torch import nn

    from diffin_lightning.replay import _StepEngine

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

        def forward(self, x):
            return torch.tanh(self.linear(x)) * self.scale

    torch.manual_seed(0)
    module = Scaled().double()
    loss_fn = lambda m, batch: torch.nn.functional.cross_entropy(m(batch["input"]), batch["target"], reduction="none")  # noqa: E731
    batches = [{"index": torch.arange(5), "input": torch.randn(5, 4, dtype=torch.float64), "target": torch.randint(0, 3, (5,))}]
    engine = _StepEngine(module, loss_fn, accumulate=1)
    params = {name: p.detach().clone() + 0.1 for name, p in module.named_parameters()}
    direction = {name: torch.randn_like(p) for name, p in params.items()}
    assert engine.uses_ghost(params) and list(engine.capture.uncovered_parameter_names) == ["scale"]
    gradient = engine.gradient(params, batches, None, keep_captures=True)
    captured = engine.dots(params, batches, None, direction)
    reference = engine.loss.dots(params, batches, direction)
    torch.testing.assert_close(captured, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient["scale"], engine.loss.batch_gradient(params, batches)["scale"], rtol=1e-10, atol=1e-12)
    engine.close()
    assert torch.equal(dict(module.named_parameters())["scale"].detach(), torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64))
