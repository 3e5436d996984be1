"""target_extrapolation's g_V, step by step, against gradients taken afresh (float64), and what it holds."""

from __future__ import annotations

import copy

import pytest
import torch

from diffin_lightning.engine import gradient_of_mean
from diffin_lightning.per_sample import PerSampleLoss
from diffin_lightning.targets import DatasetTarget
from helpers import TinyClassifier


def _as_batches(data):
    x, y = data.tensors
    return [{"input": x, "target": y}]


def test_the_extrapolated_gradient_is_formed_in_place_and_the_slope_comes_from_the_refreshed_gradients(tiny_data):
    """Refreshes at steps 0, 3, 6 (and the parameters moved between them); steps 4 and 5 in between.

    Between refreshes g_V is g(3) + (t - 3) (g(3) - g(0)) / 3, one object from step to step (the product stream
    knows a step's directions by identity), formed in the gradient's own memory: the target holds the gradient
    and the slope, no third vector. At the refresh at 6 the slope is (g(6) - g(3)) / 3 with g(3) the refreshed
    gradient (recovered from the extrapolated one), not the extrapolated g(5).
    """
    torch.manual_seed(0)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    target = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    device = torch.device("cpu")
    fresh = {}

    def at(step):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step).reshape(p.shape))
        params = loss.parameters()
        fresh[step] = {k: v.clone() for k, v in gradient_of_mean(loss, params, _as_batches(tiny_data.val)).items()}
        return target.target_gradient(loss, params, step, device, {})

    at(0)
    refreshed = at(3)
    assert target.slope is not None
    slope = {k: (fresh[3][k] - fresh[0][k]) / 3 for k in fresh[3]}
    for k in slope:
        torch.testing.assert_close(target.slope[k], slope[k], rtol=1e-12, atol=1e-14)
    fourth, fifth = at(4), at(5)
    assert fourth is fifth is refreshed  # one object: the refreshed gradient's own memory, extrapolated in place
    for k in slope:
        torch.testing.assert_close(fifth[k], fresh[3][k] + 2 * slope[k], rtol=1e-12, atol=1e-14)
    assert target.extrapolated_to == 5
    held = {id(v) for v in [*target.gradient.values(), *target.slope.values()]}
    assert len(held) == 2 * len(slope)  # the gradient and the slope, nothing else parameter-sized
    at(6)
    for k in slope:
        torch.testing.assert_close(target.gradient[k], fresh[6][k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(target.slope[k], (fresh[6][k] - fresh[3][k]) / 3, rtol=1e-10, atol=1e-13)
    assert target.extrapolated_to is None


def test_the_extrapolated_step_travels_in_the_state(tiny_data):
    """A checkpoint taken after an extrapolated step restores the gradient as it stands and the step it stands for."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    device = torch.device("cpu")
    original = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    for step in (0, 3, 4):
        with torch.no_grad():
            next(model.parameters()).add_(0.01 * (step + 1))
        original.target_gradient(loss, loss.parameters(), step, device, {})
    restored = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    restored.load_state_dict(original.state_dict(), device)
    assert restored.extrapolated_to == 4
    params = loss.parameters()
    expected, got = (t.target_gradient(loss, params, 5, device, {}) for t in (original, restored))
    for k in expected:
        assert torch.equal(expected[k], got[k])
    older = {k: v for k, v in original.state_dict().items() if k != "extrapolated_to"}  # a checkpoint from before the key
    restored.load_state_dict(older, device)
    assert restored.extrapolated_to is None


def _damped_reference(fresh, refreshes):
    """Brute force: the change per step c_k between consecutive refreshes and rho_k = clip(<c_k, c_k-1>/|c_k-1|^2, 0, 1)."""
    changes, rhos = {}, {}
    for previous, step in zip(refreshes, refreshes[1:]):
        changes[step] = torch.cat([(fresh[step][k] - fresh[previous][k]).reshape(-1) for k in fresh[step]]) / (step - previous)
        before = changes.get(previous)
        rhos[step] = 0.0 if before is None else min(1.0, max(0.0, float(changes[step] @ before / (before @ before))))
    return changes, rhos


def test_the_damped_slope_is_the_last_change_scaled_by_its_persistence(tiny_data):
    """Refreshes at 0, 3, 6, 9 (the parameters moved between them, steadily and then back and forth); steps between.

    The first change is not followed (rho = 0: no trend measured yet); later ones by rho = <c_k, c_k-1> / |c_k-1|^2
    clamped to [0, 1], against gradients taken afresh; between refreshes g_V = g(s) + rho (t - s) c_k, in place.
    """
    torch.manual_seed(0)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    target = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate="damped")
    device = torch.device("cpu")
    fresh, moves = {}, {0: 0.0, 3: 0.05, 4: 0.0, 5: 0.0, 6: 0.05, 7: 0.0, 8: 0.0, 9: -0.04, 10: 0.0}
    direction = {n: torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape) for n, p in model.named_parameters()}
    gradients = {}

    for step, move in moves.items():
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(move * direction[name])
        params = loss.parameters()
        fresh[step] = {k: v.clone() for k, v in gradient_of_mean(loss, params, _as_batches(tiny_data.val)).items()}
        gradients[step] = {k: v.clone() for k, v in target.target_gradient(loss, params, step, device, {}).items()}
        if step in (3, 6, 9):
            changes, rhos = _damped_reference(fresh, [s for s in (0, 3, 6, 9) if s <= step])
            assert float(target.persistence) == pytest.approx(rhos[step], abs=1e-12)
            if rhos[step] == 0.0:
                assert target.slope is None  # on the CPU a zero slope is not kept (persistence_known_zero)
                continue
            slope = torch.cat([v.reshape(-1) for v in target.slope.values()])
            torch.testing.assert_close(slope, rhos[step] * changes[step], rtol=1e-10, atol=1e-14)
    _, rhos = _damped_reference(fresh, [0, 3, 6, 9])
    assert rhos[3] == 0.0 and rhos[6] > 0.5 and rhos[9] == 0.0  # none measured; a steady move followed; a reversal not
    changes, _ = _damped_reference(fresh, [0, 3, 6])
    for t in (7, 8):
        expected = torch.cat([v.reshape(-1) for v in fresh[6].values()]) + rhos[6] * (t - 6) * changes[6]
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in gradients[t].values()]), expected, rtol=1e-10, atol=1e-14)
    for k in fresh[10]:  # rho = 0 after the reversal: g(9) held
        torch.testing.assert_close(gradients[10][k], fresh[9][k], rtol=1e-12, atol=1e-14)


def _steady_then_reversing(model, loss, target, steps, device, move_at=lambda step: 0.03 if step < 6 else 0.05 * (-1) ** step):
    """g_V at each step while the parameters move by ``move_at(step)`` along a fixed direction (by default steadily
    for 6 steps and then back and forth: rho > 0, then 0)."""
    direction = {n: torch.cos(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape) for n, p in model.named_parameters()}
    out = []
    for step in steps:
        move = move_at(step)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(move * direction[name])
        out.append({k: v.clone() for k, v in target.target_gradient(loss, loss.parameters(), step, device, {}).items()})
    return out


def test_a_zero_persistence_holds_g_without_a_slope_and_gives_what_a_zero_slope_gives(tiny_data, monkeypatch):
    """On the CPU, where reading rho costs nothing, a refresh with rho = 0 keeps no slope (no add a step, no half a
    vector); on an accelerator the zero slope is kept and added. Both give the same g_V at every step."""
    from diffin_lightning import targets as targets_module

    device, steps = torch.device("cpu"), list(range(16))
    runs, slopes_kept = {}, {}
    for path in ("cpu", "accelerator"):
        if path == "accelerator":
            monkeypatch.setattr(targets_module, "persistence_known_zero", lambda persistence: False)
        torch.manual_seed(0)
        model = TinyClassifier().double()
        loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
        target = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=2, extrapolate="damped")
        kept, gradients = [], []
        for step in steps:
            gradients += _steady_then_reversing(model, loss, target, [step], device)
            kept.append((step, target.slope is not None, None if target.persistence is None else float(target.persistence)))
        runs[path], slopes_kept[path] = gradients, kept
    zero_refreshes = [step for step, _, rho in slopes_kept["cpu"] if rho == 0.0 and step % 2 == 0 and step >= 2]
    assert zero_refreshes and any(rho and rho > 0 for _, _, rho in slopes_kept["cpu"]), slopes_kept["cpu"]
    for step, has_slope, rho in slopes_kept["cpu"]:
        assert has_slope == (rho is not None and rho > 0), (step, has_slope, rho)
    assert all(has_slope for step, has_slope, _ in slopes_kept["accelerator"] if step >= 2)
    for step, (cpu, accelerator) in enumerate(zip(runs["cpu"], runs["accelerator"])):
        for k in cpu:
            assert torch.equal(cpu[k], accelerator[k]), (step, k)


def test_the_persistence_and_the_last_change_travel_in_the_state(tiny_data):
    torch.manual_seed(0)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    device = torch.device("cpu")
    original = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate="damped")
    for step in (0, 3, 6, 7):
        with torch.no_grad():
            next(model.parameters()).add_(0.01 * (step + 1))
        original.target_gradient(loss, loss.parameters(), step, device, {})
    assert float(original.persistence) > 0
    restored = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate="damped")
    restored.load_state_dict(copy.deepcopy(original.state_dict()), device)  # a checkpoint's copy, not the live tensors
    for step in (8, 9, 10, 12):
        with torch.no_grad():
            next(model.parameters()).add_(0.01 * (step + 1))
        params = loss.parameters()
        expected, got = (t.target_gradient(loss, params, step, device, {}) for t in (original, restored))
        for k in expected:
            assert torch.equal(expected[k], got[k]), (step, k)
        assert torch.equal(original.persistence, restored.persistence)
    # A checkpoint taken where rho = 0 left no slope (the sketch travels alone): resumed, the same g_V and rho. The
    # parameters move one way to step 4 and back after it (refreshes every 2 steps: rho 1 at step 4, 0 at step 6, and
    # about 1 again at step 8, which the sketch of step 6's change measures).
    torch.manual_seed(1)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    turn = lambda step: 0.03 if step <= 4 else -0.03  # noqa: E731
    uninterrupted = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=2, extrapolate="damped")
    _steady_then_reversing(model, loss, uninterrupted, range(8), device, turn)
    assert uninterrupted.slope is None and float(uninterrupted.persistence) == 0.0 and uninterrupted._change_sketch is not None
    resumed = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=2, extrapolate="damped")
    resumed.load_state_dict(copy.deepcopy(uninterrupted.state_dict()), device)
    state = copy.deepcopy(model.state_dict())
    expected = _steady_then_reversing(model, loss, uninterrupted, range(8, 12), device, turn)
    assert float(uninterrupted.persistence) > 0.5  # followed again: the resumed target must know step 6's change
    model.load_state_dict(state)
    got = _steady_then_reversing(model, loss, resumed, range(8, 12), device, turn)
    for step, (a, b) in enumerate(zip(expected, got)):
        for k in a:
            assert torch.equal(a[k], b[k]), (step + 8, k)
    assert torch.equal(uninterrupted.persistence, resumed.persistence)
    # A linear run's checkpoint (a slope, no sketch) resumed damped: its slope is not followed until one is measured.
    linear = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    for step in (0, 3):
        linear.target_gradient(loss, loss.parameters(), step, device, {})
    restored.load_state_dict(linear.state_dict(), device)
    assert all(torch.count_nonzero(v) == 0 for v in restored.slope.values())


def test_the_sketched_persistence_reads_large_tensors_by_stride():
    """Tensors above the sketch size are read every stride-th coordinate, each share weighted by its stride."""
    from diffin_lightning.targets import PERSISTENCE_SKETCH_ELEMENTS, _sketch, _sketch_stride, persistence_of

    generator = torch.Generator().manual_seed(0)
    previous = {"big": torch.randn(300, 100, generator=generator, dtype=torch.float64), "bias": torch.randn(7, generator=generator, dtype=torch.float64)}
    change = {k: 0.6 * v + 0.3 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in previous.items()}
    strides = {k: _sketch_stride(v) for k, v in change.items()}
    assert strides == {"big": 8, "bias": 1} and _sketch(change)["big"].numel() == 3750 <= PERSISTENCE_SKETCH_ELEMENTS
    whole = persistence_of(change, previous)
    sketched = persistence_of(_sketch(change), _sketch(previous), strides)
    assert float(whole) == pytest.approx(0.6, abs=0.02) and float(sketched) == pytest.approx(float(whole), abs=0.02)
    # The rule's edges: a reversal and an orthogonal move are not followed; no previous change or a non-finite one gives 0.
    ones = {"w": torch.ones(4, dtype=torch.float64)}
    assert float(persistence_of({"w": -ones["w"]}, ones)) == 0.0
    assert float(persistence_of({"w": torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)}, ones)) == 0.0
    assert float(persistence_of({"w": 3 * ones["w"]}, ones)) == 1.0
    assert float(persistence_of(ones, {"w": torch.zeros(4, dtype=torch.float64)})) == 0.0
    assert float(persistence_of({"w": torch.full((4,), float("nan"), dtype=torch.float64)}, ones)) == 0.0


def test_a_float32_targets_slope_is_held_in_bfloat16_and_gives_back_the_refreshed_gradient(tiny_data):
    """Half a vector for a float32 model: the slope in bfloat16, g_V extrapolated in float32 from it, g(s) recovered
    at the next refresh from the same rounded slope (so the next change is measured from g(s), not from g(c))."""
    torch.manual_seed(0)
    model = TinyClassifier().float()
    x, y = tiny_data.val.tensors
    val = torch.utils.data.TensorDataset(x.float(), y)
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    target = DatasetTarget("val", val, batch_size=7, refresh_every_n_steps=3, extrapolate="linear")
    device, fresh, got = torch.device("cpu"), {}, {}
    for step in range(8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step).reshape(p.shape))
        params = loss.parameters()
        fresh[step] = {k: v.clone() for k, v in gradient_of_mean(loss, params, [{"input": x.float(), "target": y}]).items()}
        got[step] = {k: v.clone() for k, v in target.target_gradient(loss, params, step, device, {}).items()}
        if step >= 3:
            assert all(v.dtype == torch.bfloat16 for v in target.slope.values())
            assert all(v.dtype == torch.float32 for v in target.gradient.values())
    for k in fresh[3]:
        rounded = ((fresh[3][k] - fresh[0][k]) / 3).to(torch.bfloat16).float()
        exact = (fresh[3][k] - fresh[0][k]) / 3
        torch.testing.assert_close(got[5][k], fresh[3][k] + 2 * rounded, rtol=1e-6, atol=1e-7)  # float32 arithmetic on the rounded slope
        scale = (2 * exact).abs().max().clamp_min(1e-12)
        assert float((got[5][k] - (fresh[3][k] + 2 * exact)).abs().max()) <= 2**-7 * float(scale)  # the rounding: a fraction of the increment
        # At the refresh at 6 the slope is (g(6) - g(3)) / 3 with g(3) recovered from g(5) and the rounded slope.
        torch.testing.assert_close(target.slope[k].float(), ((fresh[6][k] - fresh[3][k]) / 3).to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(got[6][k], fresh[6][k])


def test_a_narrower_slope_is_added_in_pieces_with_the_whole_adds_result(monkeypatch):
    import diffin_lightning.targets as targets

    monkeypatch.setattr(targets, "SLOPE_ADD_PIECE_ELEMENTS", 1000)  # several pieces, the last one short
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(37, 91, generator=generator), torch.randn(5, generator=generator)]
    slopes = [torch.randn(g.shape, generator=generator).to(torch.bfloat16) for g in gradients]
    expected = [g + 2.5 * s.float() for g, s in zip(gradients, slopes)]
    targets.add_slope(gradients, slopes, 2.5)
    for got, want in zip(gradients, expected):
        assert torch.equal(got, want)
