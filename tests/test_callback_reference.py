"""Every stored component equals a brute-force float64 reference, through a real Trainer.fit."""

from __future__ import annotations

import pytest
import torch

from diffin_lightning import DiffInCallback
from helpers import (
    RTOL,
    TinyClassifier,
    TinyData,
    TrajectoryRecorder,
    exact_brackets,
    finite_difference_brackets,
    shifted,
    leaf_params,
    mean_gradient,
    sample_gradients,
    trainer,
)

EPS = 1e-6


def reference_scores(model, steps, data: TinyData, *, eps, every_n, refresh, decay, scheme, extrapolate=False, clip=None):
    """Accumulate every component by brute force over the recorded trajectory.

    ``clip``: Lightning's norm clipping (``gradient_clip_val``). A clipped step (``c = clip / (|G_B| +
    1e-6) < 1``) counts at ``eta c``; its first-order products are taken along ``P = I - kappa G_B^
    G_B^T`` (``kappa = |G_B| / (|G_B| + 1e-6)``), the Jacobian of the clipped step in ``G_B`` over ``c``:
    ``<P g, G_i>``, and ``<P G_i, G_i>`` for 'self'.

    ``extrapolate`` (``target_extrapolation``, resolved): between refreshes the 'val' target is, for
    'linear' (or True), g(s) + (t - s) c with c = (g(s) - g(s')) / (s - s') from the last two refreshes
    s' < s; for 'damped', g(s) + rho (t - s) c with rho = <c, c'> / |c'|^2 clamped to [0, 1] (c' the change
    per step of the refreshes before; rho = 0 until it exists; these parameters are below the sketch size, so
    the sketch is every coordinate); g(s) alone until two refreshes exist, and always for 'none' (or False).
    """
    extrapolate = {True: "linear", False: "none"}.get(extrapolate, extrapolate)
    x, y = data.train.tensors
    xv, yv = data.val.tensors
    n = len(y)
    names = ("val", "train", "self")
    first = {k: torch.zeros(n, dtype=torch.float64) for k in names}
    second_fd = {k: torch.zeros(n, dtype=torch.float64) for k in names}
    second_exact = {k: torch.zeros(n, dtype=torch.float64) for k in names}
    visits = torch.zeros(n, dtype=torch.float64)
    cached, refreshed_at, average, updates = None, None, None, 0
    slope, change = None, None
    represented = 0
    # second_order="propagated": decayed sums, carried by (1 - eta <u, H_B u>)^every_n with the FD curvature
    decayed_first = {k: torch.zeros(n, dtype=torch.float64) for k in ("val", "train")}
    decayed_weight = {k: torch.zeros(n, dtype=torch.float64) for k in ("val", "train")}
    target_sum = {k: 0.0 for k in ("val", "train")}
    for s in steps:
        if s.step % every_n:
            continue
        ids = torch.tensor(s.ids)
        batch = len(ids)
        p = leaf_params(s.params)
        grads = torch.stack(sample_gradients(model, p, x[ids], y[ids]))
        batch_gradient = grads.mean(0)
        lr, projected = s.lr, grads
        if clip is not None and clip / (float(batch_gradient.norm()) + 1e-6) < 1:
            length = float(batch_gradient.norm())
            lr = s.lr * clip / (length + 1e-6)
            unit = batch_gradient / length
            # P G_i (P symmetric: <P g, G_i> = <g, P G_i>)
            projected = grads - (length / (length + 1e-6)) * (grads @ unit)[:, None] * unit[None, :]
        if cached is None or s.step - refreshed_at >= refresh:
            fresh = mean_gradient(model, p, xv, yv)
            previous_change, change = change, None if cached is None else (fresh - cached) / (s.step - refreshed_at)
            slope = change
            if extrapolate == "damped" and change is not None:
                rho = 0.0
                if previous_change is not None and float(previous_change @ previous_change) > 0:
                    rho = min(1.0, max(0.0, float(change @ previous_change) / float(previous_change @ previous_change)))
                slope = rho * change
            cached, refreshed_at = fresh, s.step
        average = (1 - decay) * batch_gradient if average is None else decay * average + (1 - decay) * batch_gradient
        updates += 1
        val = cached if extrapolate == "none" or slope is None or s.step == refreshed_at else cached + (s.step - refreshed_at) * slope
        target_gradients = {"val": val, "train": average / (1 - decay**updates)}
        for name, g in target_gradients.items():
            first[name].index_add_(0, ids, every_n * lr / batch * (projected @ g))
            coefficient = every_n * (-s.step * lr**2 / batch)
            fd = finite_difference_brackets(model, s.params, x[ids], y[ids], g, eps, scheme)
            second_fd[name].index_add_(0, ids, coefficient * fd)
            second_exact[name].index_add_(0, ids, coefficient * exact_brackets(model, s.params, x[ids], y[ids], g))
            u = g / g.norm()
            plus = mean_gradient(model, shifted(s.params, u, eps), x[ids], y[ids])
            if scheme == "forward":
                curvature = float(u @ (plus - batch_gradient)) / eps
            else:
                curvature = float(u @ (plus - mean_gradient(model, shifted(s.params, u, -eps), x[ids], y[ids]))) / (2 * eps)
            factor = min(1.0, max(0.0, 1 - lr * curvature)) ** every_n
            decayed_first[name] = factor * decayed_first[name]
            decayed_first[name].index_add_(0, ids, every_n * lr / batch * (projected @ g))
            decayed_weight[name] = factor * decayed_weight[name]
            decayed_weight[name].index_add_(0, ids, torch.full((batch,), every_n * lr / batch, dtype=torch.float64))
            target_sum[name] = factor * target_sum[name] + every_n * lr / n * g
        first["self"].index_add_(0, ids, every_n * lr / batch * (projected * grads).sum(1))
        visits.index_add_(0, ids, torch.ones(batch, dtype=torch.float64))
        represented += every_n
    final = leaf_params(model_final(model))
    final_grads = torch.stack(sample_gradients(model, final, x, y))
    final_targets = {"val": mean_gradient(model, final, xv, yv), "train": average / (1 - decay**updates)}
    propagated = {
        name: decayed_first[name] + decayed_weight[name] * (final_grads @ final_targets[name]) - final_grads @ target_sum[name] - first[name]
        for name in ("val", "train")
    }
    return first, second_fd, second_exact, visits, represented, propagated


def model_final(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _close(actual, expected, rtol):
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    ("accumulate", "every_n", "refresh", "scheme", "engine"),
    [
        (1, 1, 1, "forward", "auto"),
        (2, 1, 1, "forward", "auto"),
        (1, 2, 3, "forward", "auto"),
        (1, 1, 1, "central", "auto"),
        (2, 1, 1, "forward", "functional"),
    ],
    ids=["plain", "accumulate_grad_batches=2", "every_2_refresh_3", "central", "torch.func dot products"],
)
def test_components_match_brute_force_reference(tmp_path, tiny_data, accumulate, every_n, refresh, scheme, engine):
    model = TinyClassifier().double()
    recorder = TrajectoryRecorder()
    callback = DiffInCallback(
        targets={"val": tiny_data.val, "train": "train", "self": "self"},
        eps=EPS,
        every_n_steps=every_n,
        target_refresh_every_n_steps=refresh,
        finite_difference=scheme,
        train_target_decay=0.5,
        dot_products=engine,
    )
    epochs = 3
    trainer(default_root_dir=tmp_path, max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=[recorder, callback]).fit(
        model, tiny_data.loader(batch_size=4)
    )
    assert all(len(s.ids) == 4 * accumulate for s in recorder.steps), "a step must hold all its micro-batches"
    assert len(recorder.steps) == epochs * 4 // accumulate

    # target_extrapolation left to auto: 'damped' where refreshes leave recorded steps between them, else 'none'.
    extrapolate = "damped" if refresh > every_n else "none"
    assert callback.settings.resolved_target_extrapolation == extrapolate
    first, second_fd, second_exact, visits, represented, propagated = reference_scores(
        model, recorder.steps, tiny_data, eps=EPS, every_n=every_n, refresh=refresh, decay=0.5, scheme=scheme, extrapolate=extrapolate
    )
    result = callback.influence_with("sum")
    paper = callback.influence_with("paper")
    assert callback.steps_represented == represented
    for name in ("val", "train", "self"):
        scores = result[name]
        _close(scores.first_order, first[name], RTOL)
        _close(scores.visits, visits, 0)
        if name == "self":
            assert torch.count_nonzero(scores.second_order) == 0
            continue
        # Same finite-difference formula as the reference: equal up to float64 rounding.
        _close(scores.second_order, second_fd[name], RTOL)
        # Against exact Hessian-vector products: within the finite-difference error bound.
        _close(scores.second_order, second_exact[name], 1e-4 if scheme == "forward" else 1e-6)
        assert torch.count_nonzero(scores.second_order) > 0
        _close(scores.diffin, scores.first_order + scores.second_order, RTOL)
        _close(paper[name].second_order, scores.second_order / represented, RTOL)
        _close(paper[name].diffin, scores.first_order + scores.second_order / represented, RTOL)
        default = callback.influence[name]
        assert callback.second_order == "propagated"
        _close(default.second_order, propagated[name], RTOL)
        _close(default.diffin, default.first_order + propagated[name], RTOL)
    if accumulate == 1 and every_n == 1:
        # Each sample is visited once per epoch.
        assert torch.equal(visits, torch.full_like(visits, epochs))


@pytest.mark.parametrize("mode", [True, "damped"], ids=["linear", "damped"])
@pytest.mark.parametrize(
    ("every_n", "names"),
    [(1, ("val", "train", "self")), (2, ("val", "train", "self")), (1, ("val", "self"))],
    ids=["every_step", "every_2", "streamed"],  # without a 'train' target the training step's products are streamed
)
def test_extrapolated_target_matches_brute_force_reference(tmp_path, tiny_data, every_n, names, mode, monkeypatch):
    """target_extrapolation: every component against the reference with g_V extrapolated from the last refreshes."""
    from diffin_lightning.dots import stream as stream_module
    from diffin_lightning.recorder import InfluenceRecorder

    monkeypatch.setattr(stream_module, "DEFAULT_MIN_STREAMED_ELEMENTS", 0)  # stream even these tiny layers
    streams = []
    take_stream = InfluenceRecorder._product_stream
    monkeypatch.setattr(InfluenceRecorder, "_product_stream", lambda self, *a, **k: streams.append(take_stream(self, *a, **k)) or streams[-1])
    model = TinyClassifier().double()
    recorder = TrajectoryRecorder()
    specs = {"val": tiny_data.val, "train": "train", "self": "self"}
    callback = DiffInCallback(
        targets={name: specs[name] for name in names}, eps=EPS, every_n_steps=every_n,
        target_refresh_every_n_steps=3, target_extrapolation=mode, train_target_decay=0.5,
    )
    trainer(default_root_dir=tmp_path, max_epochs=3, callbacks=[recorder, callback]).fit(model, tiny_data.loader(batch_size=4))
    first, second_fd, _, visits, represented, propagated = reference_scores(
        model, recorder.steps, tiny_data, eps=EPS, every_n=every_n, refresh=3, decay=0.5, scheme="forward", extrapolate=mode
    )
    held, *_ = reference_scores(model, recorder.steps, tiny_data, eps=EPS, every_n=every_n, refresh=3, decay=0.5, scheme="forward", extrapolate="none")
    assert (first["val"] - held["val"]).abs().max() > 1e-6 * held["val"].abs().max()  # the extrapolation moved the scores
    result = callback.influence_with("sum")
    assert any(stream is not None for stream in streams) == ("train" not in names)  # which path the test covers
    for name in names:
        _close(result[name].first_order, first[name], RTOL)
        _close(result[name].visits, visits, 0)
        if name != "self":
            _close(result[name].second_order, second_fd[name], RTOL)
            _close(callback.influence[name].second_order, propagated[name], RTOL)
    assert callback.steps_represented == represented


def test_runs_on_the_models_device_without_host_transfers_of_scores(tmp_path, tiny_data):
    """The default settings with a fixed eps (test_host_sync runs other settings): the sums stay on the model's device
    and no step after the first reads a value back, across the in-run refresh at step 10 and the damped extrapolation."""
    from test_host_sync import _strict

    callback = _strict(DiffInCallback)(targets={"val": tiny_data.val}, eps=EPS)
    model = TinyClassifier().double()
    trainer(default_root_dir=tmp_path, max_epochs=3, callbacks=[callback]).fit(model, tiny_data.loader())
    assert callback.steps_recorded == 12 and callback.settings.resolved_target_extrapolation == "damped"
    assert all(t.device == model.device for sums in callback._sums.values() for t in sums.values())
    assert callback.read_backs == [], sorted(set(callback.read_backs))


@pytest.mark.parametrize(
    ("engine", "second_order", "clip"),
    [("auto", True, 0.05), ("auto", False, 0.05), ("functional", True, 0.05), ("functional", False, 0.05), ("auto", True, 0.7), ("auto", False, 0.7)],
    ids=["diffin-all-clipped", "first-order-all-clipped", "torch.func-diffin", "torch.func-first-order", "diffin-some-clipped", "first-order-some-clipped"],
)
def test_norm_clipped_steps_match_the_reference(tmp_path, tiny_data, engine, second_order, clip, monkeypatch):
    """Under norm clipping the update is C G_B / (|G_B| + 1e-6): eta * c, and first-order terms along its Jacobian."""
    from diffin_lightning.dots import stream as stream_module
    from diffin_lightning.recorder import InfluenceRecorder

    # Stream even these tiny layers: the first order's stream must then take <G_B, G_i> during the backward.
    monkeypatch.setattr(stream_module, "DEFAULT_MIN_STREAMED_ELEMENTS", 0)
    streams = []
    take_stream = InfluenceRecorder._product_stream
    monkeypatch.setattr(InfluenceRecorder, "_product_stream", lambda self, *a, **k: streams.append(take_stream(self, *a, **k)) or streams[-1])
    model = TinyClassifier(lr=1.0).double()
    recorder = TrajectoryRecorder()
    targets = {"val": tiny_data.val, "train": "train", "self": "self"} if second_order else {"val": tiny_data.val, "self": "self"}
    callback = DiffInCallback(
        targets=targets, eps=EPS, target_refresh_every_n_steps=1, train_target_decay=0.5, dot_products=engine, compute_second_order=second_order
    )
    with pytest.warns(UserWarning, match="norm clipping: each step counts at its clipped learning rate"):
        trainer(default_root_dir=tmp_path, max_epochs=3, gradient_clip_val=clip, callbacks=[recorder, callback]).fit(
            model, tiny_data.loader(batch_size=4)
        )
    x, y = tiny_data.train.tensors
    factors = [clip / (float(mean_gradient(model, leaf_params(r.params), x[torch.tensor(r.ids)], y[torch.tensor(r.ids)]).norm()) + 1e-6) for r in recorder.steps]
    clipped = sum(f < 1 for f in factors)
    # 0.05 clips every step (by different factors); 0.7 some: unclipped steps in a clipped run take no projection.
    assert clipped == len(factors) if clip == 0.05 else 0 < clipped < len(factors)
    assert callback.influence.metadata["clipped_steps"] == clipped
    first, second_fd, _, visits, _, propagated = reference_scores(
        model, recorder.steps, tiny_data, eps=EPS, every_n=1, refresh=1, decay=0.5, scheme="forward", clip=clip
    )
    if engine == "auto" and not second_order:  # (a 'train' target, or torch.func, keeps every capture instead)
        assert streams and all(stream is not None and stream.gradient_dots for stream in streams)
    result = callback.influence_with("sum")
    for name in targets:
        _close(result[name].first_order, first[name], RTOL)
        _close(result[name].visits, visits, 0)
        if name != "self" and second_order:
            _close(result[name].second_order, second_fd[name], RTOL)
            _close(callback.influence[name].second_order, propagated[name], RTOL)


def test_first_order_only_matches_the_full_runs_first_order(tmp_path, tiny_data):
    results = {}
    for second in (True, False):
        callback = DiffInCallback(targets={"val": tiny_data.val, "train": "train"}, eps=EPS, compute_second_order=second)
        trainer(default_root_dir=tmp_path / str(second), max_epochs=2, callbacks=[callback]).fit(
            TinyClassifier().double(), tiny_data.loader()
        )
        results[second] = callback.influence
    for name in ("val", "train"):
        _close(results[False][name].first_order, results[True][name].first_order, RTOL)
        assert torch.count_nonzero(results[False][name].second_order) == 0
        assert torch.equal(results[False][name].diffin, results[False][name].first_order)
    assert results[False].metadata["compute_second_order"] is False


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "norm-clipped"])
def test_checkpoint_schedule_matches_eq9_reference(tmp_path, tiny_data, clip):
    """schedule='checkpoints': every sample at m evenly spaced steps, the step's batch as proxy (Eq. 9).

    Norm-clipped: the checkpoint's step at eta * c, its first-order terms along the clipped step's Jacobian.
    """
    model = TinyClassifier().double()
    recorder = TrajectoryRecorder()
    m, epochs = 3, 3
    callback = DiffInCallback(
        targets={"val": tiny_data.val, "train": "train", "self": "self"}, eps=EPS, schedule="checkpoints", num_checkpoints=m
    )
    trainer(default_root_dir=tmp_path, max_epochs=epochs, gradient_clip_val=clip, callbacks=[recorder, callback]).fit(model, tiny_data.loader())
    total = len(recorder.steps)
    assert callback.checkpoint_steps == [2, 6, 10] and total == 12

    x, y = tiny_data.train.tensors
    xv, yv = tiny_data.val.tensors
    n = len(y)
    first = {k: torch.zeros(n, dtype=torch.float64) for k in ("val", "train", "self")}
    second_fd = {k: torch.zeros(n, dtype=torch.float64) for k in ("val", "train")}
    eq9_exact = {k: torch.zeros(n, dtype=torch.float64) for k in ("val", "train")}
    clipped_checkpoints = 0
    for s in recorder.steps:
        if s.step not in callback.checkpoint_steps:
            continue
        proxy = torch.tensor(s.ids)
        p = leaf_params(s.params)
        grads = torch.stack(sample_gradients(model, p, x, y))
        lr, projected = s.lr, grads
        batch_gradient = grads[proxy].mean(0)
        length = float(batch_gradient.norm())
        if clip is not None and clip / (length + 1e-6) < 1:
            lr = s.lr * clip / (length + 1e-6)
            unit = batch_gradient / length
            projected = grads - (length / (length + 1e-6)) * (grads @ unit)[:, None] * unit[None, :]
            clipped_checkpoints += 1
        targets = {"val": mean_gradient(model, p, xv, yv), "train": grads.mean(0)}  # exact full-data gradient
        for name, g in targets.items():
            first[name] += (total / m) * lr / n * (projected @ g)
            fd = finite_difference_brackets(model, s.params, x[proxy], y[proxy], g, EPS, samples=(x, y))
            second_fd[name] += (total / m) * (-s.step * lr**2 / n) * fd
            exact = exact_brackets(model, s.params, x[proxy], y[proxy], g, samples=(x, y))
            eq9_exact[name] += -s.step * lr**2 / (n * m) * exact
        first["self"] += (total / m) * lr / n * (projected * grads).sum(1)
    assert clipped_checkpoints == (0 if clip is None else m)

    summed, paper = callback.influence_with("sum"), callback.influence_with("paper")
    for name in ("val", "train", "self"):
        _close(summed[name].first_order, first[name], RTOL)
        _close(summed[name].visits, torch.full((n,), float(m), dtype=torch.float64), 0)
    for name in ("val", "train"):
        _close(summed[name].second_order, second_fd[name], RTOL)
        # Under the paper's normalization the stored term is Eq. 9 itself (1/m, coefficient -t eta^2/N).
        _close(paper[name].second_order, eq9_exact[name], 1e-4)


def test_dataloader_target_equals_dataset_target(tmp_path, tiny_data):
    from torch.utils.data import DataLoader

    from diffin_lightning import IndexedDataset

    results = []
    for target in (tiny_data.val, DataLoader(IndexedDataset(tiny_data.val), batch_size=4)):
        callback = DiffInCallback(targets={"val": target}, eps=EPS)
        trainer(default_root_dir=tmp_path / str(len(results)), max_epochs=2, callbacks=[callback]).fit(
            TinyClassifier().double(), tiny_data.loader()
        )
        results.append(callback.influence_with("sum")["val"])
    _close(results[1].first_order, results[0].first_order, RTOL)
    _close(results[1].second_order, results[0].second_order, RTOL)


def test_target_subsets_are_drawn_per_refresh(tmp_path, tiny_data, monkeypatch):
    """max_samples below the target's size: each refresh (every step here) uses a seeded subset drawn afresh, so
    scores differ from the full target but repeat exactly for the same seed."""
    from diffin_lightning.targets import DatasetTarget

    batches = DatasetTarget._batches
    drawn: list[dict[int, list[int]]] = []  # per run: in-run refresh step -> the target ids its batches held

    def spy(self, step, whole=False):
        ids = [] if whole else drawn[-1].setdefault(step, [])
        for batch in batches(self, step, whole):
            ids.extend(batch["index"].tolist())
            yield batch

    monkeypatch.setattr(DatasetTarget, "_batches", spy)
    scores = []
    for max_samples in (None, 3, 3):
        drawn.append({})
        callback = DiffInCallback(targets={"val": tiny_data.val}, eps=EPS, target_max_samples=max_samples, target_refresh_every_n_steps=1)
        trainer(default_root_dir=tmp_path / str(len(scores)), max_epochs=1, callbacks=[callback]).fit(
            TinyClassifier().double(), tiny_data.loader()
        )
        scores.append(callback.influence["val"].first_order)
    assert not torch.allclose(scores[1], scores[0])
    assert torch.equal(scores[1], scores[2])
    subsets = drawn[1]
    assert sorted(subsets) == [0, 1, 2, 3] and all(len(set(ids)) == 3 for ids in subsets.values())
    assert len({frozenset(ids) for ids in subsets.values()}) == 4, subsets  # a new subset at every refresh
    assert drawn[2] == subsets  # the same seed draws the same subsets


def test_end_of_fit_drift_uses_the_whole_target_with_subset_refreshes(tmp_path, tiny_data):
    """In-run refreshes use max_samples-sized subsets; the drift correction's g_V(theta_T), used once with full
    weight, is the whole target's gradient (its noise would not average out)."""
    model = TinyClassifier().double()
    callback = DiffInCallback(targets={"val": tiny_data.val}, eps=EPS, target_max_samples=3)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(model, tiny_data.loader())
    x, y = tiny_data.train.tensors
    xv, yv = tiny_data.val.tensors
    assert len(yv) > 3
    final = leaf_params(model_final(model))
    final_grads = torch.stack(sample_gradients(model, final, x, y))
    whole = mean_gradient(model, final, xv, yv)
    sums = callback._accumulator.sums["val"]
    past = callback._accumulator.parameter_states["val"]
    past_flat = torch.cat([past[name].flatten() for name, _ in model.named_parameters()])
    expected = sums["decayed_weight"] * (final_grads @ whole) - final_grads @ past_flat
    _close(callback._recorder.drift["val"], expected, RTOL)
    subset = DiffInCallback(targets={"val": tiny_data.val}).targets[0]
    subset.max_samples = 3
    from diffin_lightning.per_sample import PerSampleLoss

    in_run = subset.target_gradient(PerSampleLoss(model, lambda m, b: m.per_sample_loss(b)), final, 0, torch.device("cpu"), {})
    assert not torch.allclose(torch.cat([g.flatten() for g in in_run.values()]), whole), "the test needs a subset that differs"


@pytest.mark.parametrize("streamed", [False, True], ids=["held", "streamed"])
def test_bf16_autocast_first_order_reads_the_training_steps_captures(tmp_path, monkeypatch, streamed):
    """Under bf16-mixed a run without a finite difference takes its products from the training step's own
    bfloat16 captures (read in float32) and ``.grad``: no full-precision recomputation after the first step's
    check, and every first-order component within bfloat16's rounding of the float64 reference along the
    run's own trajectory; held to the end of the backward (a 'train' target) or taken during it (a stream).
    A run with a second order still recomputes in full precision."""
    from types import SimpleNamespace

    from diffin_lightning.dots import stream as stream_module
    from diffin_lightning.recorder import InfluenceRecorder

    data = TinyData.make(num_train=16, num_val=6, seed=0, dtype=torch.float32)
    recomputations, streams = [], []
    recapture, take_stream = InfluenceRecorder._recaptured, InfluenceRecorder._product_stream
    monkeypatch.setattr(InfluenceRecorder, "_recaptured", lambda self, *a, **k: recomputations.append(1) or recapture(self, *a, **k))
    monkeypatch.setattr(InfluenceRecorder, "_product_stream", lambda self, *a, **k: streams.append(take_stream(self, *a, **k)) or streams[-1])
    monkeypatch.setattr(stream_module, "DEFAULT_MIN_STREAMED_ELEMENTS", 0)  # stream even these tiny layers
    model = TinyClassifier(lr=1.0)
    recorder = TrajectoryRecorder()
    targets = {"val": data.val, "self": "self"} if streamed else {"val": data.val, "train": "train", "self": "self"}
    decay = {} if streamed else {"train_target_decay": 0.5}
    callback = DiffInCallback(targets=targets, target_refresh_every_n_steps=1, compute_second_order=False, **decay)
    trainer(default_root_dir=tmp_path, max_epochs=3, precision="bf16-mixed", callbacks=[recorder, callback]).fit(model, data.loader(batch_size=4))
    assert callback.influence.metadata["per_sample_engine"].startswith("captured from the training step (bf16-mixed")
    assert len(recorder.steps) == 12 and len(recomputations) == (0 if streamed else 1)  # the first step's check (streamed: no view kept)
    assert len(streams) == 12 and all((stream is not None) == streamed for stream in streams)

    # The reference: float64, full precision, per-sample gradients at each recorded theta_t.
    reference_model = TinyClassifier(lr=1.0).double()
    steps64 = [SimpleNamespace(step=s.step, ids=s.ids, lr=s.lr, params={k: v.double() for k, v in s.params.items()}) for s in recorder.steps]
    (x, y), (xv, yv) = data.train.tensors, data.val.tensors
    with torch.no_grad():
        for name, value in reference_model.named_parameters():
            value.copy_(dict(model.named_parameters())[name].double())
    data64 = TinyData(torch.utils.data.TensorDataset(x.double(), y), torch.utils.data.TensorDataset(xv.double(), yv))
    first, *_ = reference_scores(reference_model, steps64, data64, eps=EPS, every_n=1, refresh=1, decay=0.5, scheme="forward")
    gaps = {}
    for name in targets:
        actual, expected = callback.influence[name].first_order.double(), first[name]
        gaps[name] = float((actual - expected).abs().max() / expected.abs().max())
        # bfloat16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per input and per output gradient).
        assert gaps[name] < 1e-2, gaps
    assert max(gaps.values()) > 1e-6, gaps  # the products did come from bfloat16 captures, not a float32 recomputation

    # With a second-order term the finite difference needs full-precision products at both points: recomputed.
    recomputations.clear()
    second = DiffInCallback(targets={"val": data.val}, target_refresh_every_n_steps=1)
    trainer(default_root_dir=tmp_path / "second", max_epochs=1, precision="bf16-mixed", callbacks=[second]).fit(
        TinyClassifier(lr=1.0), data.loader(batch_size=4)
    )
    assert second.influence.metadata["per_sample_engine"] == "captured from one recomputed full-precision forward+backward per step (mixed precision)"
    assert len(recomputations) >= 4  # at least one full-precision pass per recorded step


def test_a_module_lightning_converts_to_float64_scores_as_one_built_in_float64(tmp_path, tiny_data):
    # precision="64-true" converts a float32 module after the callbacks' setup, where the capture is planned: the
    # dtype its layers are read in must be the parameters' at the step, not at the plan (a float32 reading of a
    # float64 layer failed in the fidelity benchmark's fits).
    influences = {}
    for built in ("float32", "float64"):
        model = TinyClassifier() if built == "float32" else TinyClassifier().double()
        callback = DiffInCallback(targets={"val": tiny_data.val, "self": "self"}, eps=EPS, target_refresh_every_n_steps=1)
        trainer(default_root_dir=tmp_path / built, max_epochs=2, callbacks=[callback]).fit(model, tiny_data.loader())
        assert next(model.parameters()).dtype == torch.float64
        influences[built] = callback.influence
    for name in ("val", "self"):
        for component in ("first_order", "second_order", "diffin"):
            _close(getattr(influences["float32"][name], component), getattr(influences["float64"][name], component), RTOL)
