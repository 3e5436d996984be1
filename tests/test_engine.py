"""Capture from the training step: same numbers as recomputation, the first-step check, dropout and batch norm."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from diffin_lightning import DiffInCallback, EpochSeededSampler, IndexedDataset
from helpers import RTOL, TinyClassifier, TinyData, captured_model, trainer

EPS = 1e-6


def _fit(tmp_path, model, loader, *, epochs=2, accumulate=1, **options):
    callback = DiffInCallback(targets={"val": options.pop("val"), "train": "train", "self": "self"}, **{"eps": EPS, **options})
    trainer(default_root_dir=tmp_path, max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=[callback]).fit(model, loader)
    return callback


def _assert_same_scores(a, b, rtol=RTOL):
    for second_order in ("sum", "propagated"):
        left, right = a.influence_with(second_order), b.influence_with(second_order)
        for name in left:
            for component in ("first_order", "second_order", "diffin", "visits"):
                expected = right[name].component(component)
                scale = expected.abs().max().clamp_min(1e-30)
                torch.testing.assert_close(left[name].component(component), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_captured_equals_recomputed_with_unequal_micro_batches(tmp_path, accumulate):
    """14 samples in batches of 4: the last batch holds 2, so under accumulation one step has unequal micro-batches."""
    data = TinyData.make(num_train=14, num_val=6, seed=3)
    runs = {}
    for engine in ("auto", "functional"):
        runs[engine] = _fit(
            tmp_path / engine, TinyClassifier().double(), data.loader(batch_size=4), accumulate=accumulate, val=data.val,
            dot_products=engine, target_refresh_every_n_steps=1,
        )
    assert runs["auto"]._recorder.use_capture and not runs["functional"]._recorder.use_capture
    assert runs["auto"].influence.metadata["per_sample_engine"] == "captured from the training step"
    _assert_same_scores(runs["auto"], runs["functional"])


class SummedLoss(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).sum()  # not the mean: .grad is |B| times G_B


def test_a_training_loss_that_is_not_the_mean_falls_back_once_with_a_warning(tmp_path, tiny_data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _fit(tmp_path / "sum", SummedLoss(lr=0.02).double(), tiny_data.loader(), val=tiny_data.val)
    relevant = [w for w in caught if "differs from the gradient of the mean" in str(w.message)]
    assert len(relevant) == 1 and "returns a sum instead of a mean" in str(relevant[0].message)
    assert not fallback._recorder.use_capture
    assert "recomputed forward+backward" in fallback.influence.metadata["per_sample_engine"]
    reference = _fit(tmp_path / "ref", SummedLoss(lr=0.02).double(), tiny_data.loader(), val=tiny_data.val, dot_products="functional")
    _assert_same_scores(fallback, reference)


class DropoutNorm(TinyClassifier):
    """Dropout and batch norm: the extra passes must reuse the step's masks and never move the running statistics."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        layers = [nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3)]
        if norm:
            layers.insert(1, nn.BatchNorm1d(8))
        self.net = nn.Sequential(*layers, nn.Linear(8, 3))


@pytest.mark.parametrize("norm", [False, True], ids=["dropout", "dropout+batchnorm"])
def test_dropout_masks_are_replayed_and_training_is_untouched(tmp_path, tiny_data, norm):
    def train(with_callback):
        model = DropoutNorm(norm).double()
        torch.manual_seed(5)
        # No "self" target with batch norm: its per-sample gradients need vmap, which batch statistics refuse.
        targets = {"val": tiny_data.val} if norm else {"val": tiny_data.val, "self": "self"}
        callbacks = [DiffInCallback(targets=targets, eps=EPS, allow_batch_mixing=norm)] if with_callback else []
        trainer(default_root_dir=tmp_path / str(with_callback), max_epochs=2, callbacks=callbacks).fit(model, tiny_data.loader())
        return model, callbacks

    plain, _ = train(False)
    model, (callback,) = train(True)
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs with the callback attached"
    # The first-step check recomputes the gradient with the replayed random state: it only passes
    # if the replay draws the training step's dropout masks.
    if not norm:
        assert callback._recorder.use_capture, callback.influence.metadata["per_sample_engine"]
    scores = callback.influence["val"]
    assert torch.isfinite(scores.diffin).all() and scores.second_order.abs().sum() > 0


def test_batched_training_set_equals_the_dataloader():
    from diffin_lightning.engine import training_set_batches

    data = TinyData.make(num_train=10, num_val=2, seed=0)
    dataset = IndexedDataset(data.train)
    fast = list(training_set_batches(dataset, 4, torch.device("cpu")))
    slow = list(DataLoader(dataset, batch_size=4, shuffle=False))
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])


def test_loader_with_sampler_and_float32_model(tmp_path, tiny_data):
    """float32: the first-step check passes at float32 tolerance and the scores are finite."""
    x, y = tiny_data.train.tensors
    from torch.utils.data import TensorDataset

    train = IndexedDataset(TensorDataset(x.float(), y))
    loader = DataLoader(train, batch_size=4, sampler=EpochSeededSampler(len(train)))
    val = TensorDataset(tiny_data.val.tensors[0].float(), tiny_data.val.tensors[1])
    callback = DiffInCallback(targets={"val": val})
    pl_trainer = trainer(default_root_dir=tmp_path, max_epochs=2, precision="32-true", callbacks=[callback])
    pl_trainer.fit(TinyClassifier(), loader)
    assert callback._recorder.use_capture
    assert torch.isfinite(callback.influence["val"].diffin).all()


def test_two_callbacks_on_one_model_do_not_see_each_others_passes(tmp_path, tiny_data):
    def callback(scheme):
        return DiffInCallback(targets={"val": tiny_data.val, "self": "self"}, eps=EPS, finite_difference=scheme)

    together = [callback("forward"), callback("central")]
    trainer(default_root_dir=tmp_path / "both", max_epochs=2, callbacks=together).fit(TinyClassifier().double(), tiny_data.loader())
    for index, scheme in enumerate(("forward", "central")):
        alone = callback(scheme)
        trainer(default_root_dir=tmp_path / scheme, max_epochs=2, callbacks=[alone]).fit(TinyClassifier().double(), tiny_data.loader())
        assert together[index]._recorder.use_capture
        _assert_same_scores(together[index], alone)


def test_products_only_capture_pass_computes_no_parameter_gradient_and_equal_products():
    """The drift pass's capture: backward to the covered layers' outputs only; its products equal the full pass's."""
    from diffin_lightning.engine import MicroBatch, StepCapture, capture_pass
    from diffin_lightning.per_sample import PerSampleLoss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    inputs, labels = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = PerSampleLoss(model, lambda module, batch: nn.functional.cross_entropy(module(batch[0]), batch[1], reduction="none"), seed=None)
    names = [name for name, _ in model.named_parameters()]
    capture = StepCapture(model, names)
    computed: list[str] = []
    for name, parameter in model.named_parameters():
        parameter.register_hook(lambda grad, name=name: computed.append(name))
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    results = {}
    for products_only in (False, True):
        computed.clear()
        summed, per_sample = capture_pass(capture, loss, names, None, [MicroBatch((inputs, labels), 7)], summed_gradient=not products_only)
        assert (computed == []) == products_only, computed
        assert (summed == {}) == products_only
        results[products_only] = (per_sample.dots([direction]), per_sample.squared_norms(), per_sample.gradient_dots())
    for full, only in zip(results[False], results[True]):
        torch.testing.assert_close(only, full, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())
    capture.remove()


class _Scale(nn.Module):
    """An elementwise scale: a layer outside the capture rules (its parameter goes through the fallback)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("covered", [True, False])
def test_perturbed_pass_skips_the_gram_form_layers_parameter_gradients_and_equals_the_recomputed_one(covered):
    """The perturbed pass computes no parameter gradient for the layers whose f_i is in the Gram form; (<s, G_B>, f_i) unchanged.

    Wide layers at a small batch take the Gram form, the narrow head the direct one (it reads G_B).
    With a layer outside the rules (a bare parameter) the pass needs every parameter gradient.
    """
    from diffin_lightning.engine import CapturedStep, RecomputedStep, ScaledShift, capture_pass

    torch.manual_seed(0)
    layers = [nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.LayerNorm(48)] + ([] if covered else [_Scale(48)]) + [nn.Linear(48, 3)]
    model = nn.Sequential(*layers).double()
    inputs, labels = torch.randn(3, 32, dtype=torch.float64), torch.randint(0, 3, (3,))
    loss, names, params, capture, micro_batches = captured_model(model, inputs, labels)
    assert bool(capture.uncovered) != covered
    gradient, per_sample = capture_pass(capture, loss, names, None, micro_batches)
    gradient = {name: value / 3 for name, value in gradient.items()}
    gram = per_sample.gram_form_parameters()
    assert "0.weight" in gram and f"{len(layers) - 1}.weight" not in gram  # the wide first layer: Gram; the head: direct
    direction = {name: torch.randn_like(p) for name, p in params.items()}
    shift = ScaledShift(direction, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64))
    step = CapturedStep(capture, loss, params, micro_batches, per_sample, gradient)
    step.release_theta()
    computed: list[str] = []
    for name, parameter in model.named_parameters():
        parameter.register_hook(lambda grad, name=name: computed.append(name))
    captured = step.perturbed_along(shift, shift.negated())
    assert set(computed) == (set(names) - gram if covered else set(names)), computed
    recomputed = RecomputedStep(loss, params, [(inputs, labels)], 3).perturbed_along(shift, shift.negated())
    for mine, reference in zip(captured, recomputed):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-14)
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())  # moved back bit for bit
    capture.remove()


def test_perturbed_passes_run_after_the_steps_captured_factors_are_let_go(tmp_path, tiny_data, monkeypatch):
    """Peak memory: the training step's captured activations and output gradients are not held during a perturbed pass."""
    from diffin_lightning.engine import CapturedStep

    original = CapturedStep.perturbed_along
    held = []

    def perturbed_along(self, *args):
        held.append(self.per_sample is not None)
        return original(self, *args)

    monkeypatch.setattr(CapturedStep, "perturbed_along", perturbed_along)
    for scheme in ("forward", "central"):
        callback = DiffInCallback(targets={"val": tiny_data.val, "train": "train", "self": "self"}, finite_difference=scheme)
        trainer(default_root_dir=tmp_path / scheme, max_epochs=1, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert held and not any(held)


def test_only_steps_with_a_perturbed_pass_plan_it(tmp_path, tiny_data, monkeypatch):
    """The per-layer cost model for the perturbed pass runs only where one follows the backward: never for first order,
    nor where the passes ran ahead of the forward (one micro-batch a step); with two micro-batches a step, at every step."""
    from diffin_lightning.dots.per_sample_dots import PerSampleDots

    original = PerSampleDots.gram_form_parameters
    calls = []
    monkeypatch.setattr(PerSampleDots, "gram_form_parameters", lambda self: calls.append(1) or original(self))
    for second_order, accumulate, planned in ((False, 1, False), (True, 1, False), (True, 2, True)):
        calls.clear()
        callback = DiffInCallback(targets={"val": tiny_data.val}, compute_second_order=second_order)
        trainer(default_root_dir=tmp_path / f"{second_order}{accumulate}", max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[callback]).fit(
            TinyClassifier().double(), tiny_data.loader()
        )
        assert bool(calls) == planned, (second_order, accumulate, len(calls))


def test_scaled_shift_moves_by_the_rounded_unit_direction_times_the_step_and_holds_no_buffer_after():
    """The move is exactly ``(direction / norm) * step`` per element (the rounding the finite differences were
    built on), restored bit for bit; dot products and per-sample products agree with the materialised shift."""
    from diffin_lightning.engine import ScaledShift, module_moved_to

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    norm, step = torch.tensor(3.7), torch.tensor(1e-3)
    shift = ScaledShift(direction, norm, step)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with module_moved_to(model, shift) as moved:
        for name, value in moved.items():
            assert torch.equal(value.detach(), before[name] + (direction[name] / norm) * step), name
        assert not shift._scratch  # let go before the pass at the moved point
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])
    other = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    materialised = shift.materialised()
    expected = sum((materialised[name].double() * other[name].double()).sum() for name in other)
    assert torch.allclose(shift.dot(other).double(), expected, rtol=1e-6)
    assert torch.allclose(shift.negated().dot(other).double(), -expected, rtol=1e-6)
    assert shift.dot({}).item() == 0.0
    only_bias = {"2.bias": other["2.bias"]}
    assert torch.allclose(shift.dot(only_bias).double(), (materialised["2.bias"].double() * other["2.bias"].double()).sum(), rtol=1e-6)



def test_scaled_shift_keeps_one_scratch_per_dtype():
    """A model whose parameters differ in dtype: each share is formed in a buffer of its own dtype (a float64 scratch
    viewed as a float32 parameter's share could not be added to it in place)."""
    from diffin_lightning.engine import ScaledShift, module_moved_to

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5).double(), nn.Linear(5, 2))  # float64 then float32
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    norm, step = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)
    shift = ScaledShift(direction, norm, step)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with module_moved_to(model, shift) as moved:
        for name, value in moved.items():
            expected = before[name] + torch.div(direction[name], norm).to(value.dtype).mul_(step.to(value.dtype))
            assert value.dtype == before[name].dtype and torch.allclose(value.detach(), expected), name
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    other = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    assert shift.dot(other).dtype == torch.float64  # summed in the widest dtype of the parts


@pytest.mark.parametrize("covered", [True, False])
def test_the_perturbed_pass_moves_by_a_scaled_shift_without_a_copy_of_it_where_every_layer_is_captured(monkeypatch, covered):
    """``perturbed`` (DDP's and the fallback's pass) takes the shift as one share at a time where no layer needs the fallback.

    Bit for bit the pass at the materialised shift: the same elementwise operations move the parameters.
    With a layer outside the rules the fallback's functional pass reads the moved point, and the shift is
    materialised for it.
    """
    from diffin_lightning.engine import CapturedStep, ScaledShift, capture_pass

    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Tanh()] + ([] if covered else [_Scale(8)]) + [nn.Linear(8, 3)]
    model = nn.Sequential(*layers).double()
    inputs, labels = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    loss, names, params, capture, micro_batches = captured_model(model, inputs, labels)
    direction = {name: torch.randn_like(p) for name, p in params.items()}
    shift = ScaledShift(direction, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64))

    def step() -> CapturedStep:
        gradient, per_sample = capture_pass(capture, loss, names, None, micro_batches)
        return CapturedStep(capture, loss, params, micro_batches, per_sample, {name: value / 4 for name, value in gradient.items()})

    reference_gradient, reference_f = step().perturbed(shift.materialised())
    materialised = []
    original = ScaledShift.materialised
    monkeypatch.setattr(ScaledShift, "materialised", lambda self: materialised.append(1) or original(self))
    gradient, f = step().perturbed(shift)
    assert len(materialised) == (0 if covered else 1)
    assert torch.equal(f, reference_f) and all(torch.equal(gradient[name], reference_gradient[name]) for name in names)
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())  # moved back bit for bit
    # DDP's perturbed_along hands the shift over as it is (a world of two, its averages over ranks the identity here).
    from diffin_lightning import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "mean_over_ranks", lambda params: dict(params))
    materialised.clear()
    along, f = step().perturbed_along(shift, shift)
    assert len(materialised) == (0 if covered else 1)
    assert torch.equal(f, reference_f) and torch.equal(along, shift.dot(reference_gradient))
    capture.remove()


def test_scaled_shift_dot_reads_a_large_parameter_in_pieces_with_each_element_rounded_as_the_move():
    """A parameter over DOT_CHUNK_ELEMENTS: the share is formed a piece at a time (no scratch of its size), each
    element the same ``(direction / norm) * step`` the move uses; the sum agrees with the whole share's dot."""
    from diffin_lightning.engine import DOT_CHUNK_ELEMENTS, ScaledShift

    g = torch.Generator().manual_seed(0)
    direction = {"big": torch.randn(3, DOT_CHUNK_ELEMENTS + 5, generator=g, dtype=torch.float64), "small": torch.randn(7, generator=g, dtype=torch.float64)}
    other = {name: torch.randn(value.shape, generator=g, dtype=torch.float64) for name, value in direction.items()}
    shift = ScaledShift(direction, torch.tensor(2.5, dtype=torch.float64), torch.tensor(1e-4, dtype=torch.float64))
    expected = sum(((direction[n] / shift.norm) * shift.step * other[n]).sum() for n in direction)
    # atol=0: under allclose's default atol (1e-8) these sums (about 0.02) passed with a relative error up to 5e-7.
    torch.testing.assert_close(shift.dot(other), expected, rtol=1e-12, atol=0)
    assert all(buffer.numel() < direction["big"].numel() for buffer in shift._scratch.values())
    torch.testing.assert_close(shift.dot({"big": other["big"]}), ((direction["big"] / shift.norm) * shift.step * other["big"]).sum(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- covered layers beside the functional fallback


class _Mean(nn.Module):
    """The mean over the tokens (no parameter)."""

    def forward(self, x):
        return x.mean(1)


class _ChannelScale(nn.Module):
    """A per-channel scale of a feature map: outside the capture rules."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(channels, 1, 1))

    def forward(self, x):
        return x * self.weight


class _FallbackClassifier(TinyClassifier):
    """TinyClassifier's loss and optimiser around a model mixing covered layers with one the rules leave to the fallback."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        if kind == "scale":  # Linear-Tanh-Scale-Linear
            self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), _Scale(4), nn.Linear(4, 3))
        elif kind == "conv":
            self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), _ChannelScale(4), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
        elif kind == "token":
            self.net = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh(), _Scale(8), _Mean(), nn.Linear(8, 3))
        else:  # attention with add_bias_kv: its bias_k and bias_v lie outside MultiheadAttention's rule
            self.embed = nn.Embedding(11, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
            self.net = nn.Sequential(nn.Tanh(), _Mean(), nn.Linear(8, 3))
        self.kind = kind

    def forward(self, x):
        if self.kind != "attention":
            return self.net(x)
        hidden = self.embed(x)
        # The math kernel: torch.func's reference engine takes forward-mode products through it (the CPU's flash kernel has none).
        with sdpa_kernel(SDPBackend.MATH):
            return self.net(hidden + self.attention(hidden, hidden, hidden, need_weights=False)[0])


def _fallback_data(kind: str) -> TinyData:
    """14 training samples (a last batch of 2 in batches of 4) and 6 target samples of the model's input kind."""
    g = torch.Generator().manual_seed(3)
    count = 20
    if kind in ("token", "attention"):
        inputs = torch.randint(0, 11, (count, 5), generator=g)
    elif kind == "conv":
        inputs = torch.randn(count, 2, 5, 5, generator=g, dtype=torch.float64)
    else:
        inputs = torch.randn(count, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (count,), generator=g)
    return TinyData(TensorDataset(inputs[:14], labels[:14]), TensorDataset(inputs[14:], labels[14:]))


@pytest.mark.parametrize("kind", ["scale", "conv", "token", "attention"])
def test_captured_equals_recomputed_with_covered_and_fallback_parameters(tmp_path, kind):
    """A real fit of a model whose parameters are partly captured, partly the functional fallback's: the same
    first-order, second-order and Diff-In scores as the all-torch.func engine, to 1e-9 in float64.

    eps is the same fixed 1e-4 in both: the engines' f_i differ by rounding (1e-16), which a finite difference over
    eps magnifies by 1/eps; at 1e-6 the conv model's 'sum' second order differed by 9.7e-10 of its largest score,
    at 1e-4 by 1e-11 (every case), well inside the tolerance.
    """
    data = _fallback_data(kind)
    runs = {}
    for engine in ("auto", "functional"):
        runs[engine] = _fit(
            tmp_path / engine, _FallbackClassifier(kind).double(), data.loader(batch_size=4), val=data.val, dot_products=engine,
            target_refresh_every_n_steps=1, eps=1e-4,
        )
    recorder = runs["auto"]._recorder
    assert recorder.use_capture and recorder.capture.covered and recorder.capture.uncovered, recorder.capture.uncovered
    assert runs["auto"].influence.metadata["per_sample_engine"] == "captured from the training step"
    _assert_same_scores(runs["auto"], runs["functional"], rtol=1e-9)
    assert runs["auto"].influence["val"].second_order.abs().max() > 0


def test_the_fallback_message_names_each_module_by_its_path_and_the_supported_layers_once(tmp_path, tiny_data, caplog):
    """Logged once per fit: the module by its path in the model and its type, the supported layers listed once."""
    from diffin_lightning.dots import supported_layers_message

    caplog.set_level(logging.INFO)
    callback = DiffInCallback(targets={"val": tiny_data.val}, eps=EPS)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(_FallbackClassifier("scale").double(), tiny_data.loader())
    messages = [record.getMessage() for record in caplog.records if "functional fallback" in record.getMessage()]
    assert len(messages) == 1, messages
    (message,) = messages
    assert "1 of 5 trainable parameters" in message
    assert "net.2 (_Scale) has no rule; weight goes through the fallback" in message, message
    assert message.count("Supported layers") == 1 and message.count(supported_layers_message()) == 1, message
    assert "supported:" not in message and "owned by" not in message


def test_attention_with_add_bias_kv_is_reported_as_covered_but_for_bias_k_and_bias_v(tmp_path, caplog):
    """MultiheadAttention has a rule: its bias_k and bias_v go through the fallback, and the message says so
    (not that the module has no rule while listing it as supported)."""
    caplog.set_level(logging.INFO)
    data = _fallback_data("attention")
    callback = _fit(tmp_path, _FallbackClassifier("attention").double(), data.loader(batch_size=4), val=data.val, epochs=1)
    assert callback._recorder.capture.uncovered == ("attention.bias_k", "attention.bias_v")
    (message,) = [record.getMessage() for record in caplog.records if "functional fallback" in record.getMessage()]
    assert (
        "attention (MultiheadAttention): MultiheadAttention's rule covers its projections "
        "(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias); bias_k and bias_v go through the fallback"
    ) in message, message
    assert "no rule" not in message, message


# ---------------------------------------------------------------- the passes a recorded step costs


class _ForwardCounter(pl.Callback):
    """The model's forward calls (a pre-hook on the LightningModule) as each training batch starts and when training ends.

    First in the callback list: its hooks run before DiffInCallback's, so the calls between two batch starts are
    all of one step's (its early perturbed passes, its training forward, whatever runs after its backward).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.marks: list[int] = []

    def setup(self, trainer, pl_module, stage):
        pl_module.register_forward_pre_hook(lambda module, args: setattr(self, "calls", self.calls + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append(self.calls)

    def on_train_end(self, trainer, pl_module):
        self.marks.append(self.calls)

    def per_step(self) -> list[int]:
        return [after - before for before, after in zip(self.marks, self.marks[1:])]


@pytest.mark.parametrize(
    "options, forwards",
    [(dict(), 2), (dict(compute_second_order=False), 1), (dict(finite_difference="central"), 3)],
    ids=["default", "first-order", "central"],
)
def test_a_recorded_step_runs_the_model_forward_once_more_than_training_per_perturbed_point(tmp_path, tiny_data, monkeypatch, options, forwards):
    """The training step's own forward+backward give the products: a recorded step after the first (no target
    refresh, no first-step check) runs the training forward and one forward per perturbed point, no other."""
    from diffin_lightning.targets import DatasetTarget

    refreshes = []
    original = DatasetTarget._refresh

    def refresh(self, loss, params, step, device, whole):
        refreshes.append((step, whole))
        return original(self, loss, params, step, device, whole)

    monkeypatch.setattr(DatasetTarget, "_refresh", refresh)
    counter = _ForwardCounter()
    callback = DiffInCallback(targets={"val": tiny_data.val}, eps=EPS, target_refresh_every_n_steps=1000, **options)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[counter, callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback.steps_recorded == 8 and callback._recorder.use_capture
    assert [step for step, whole in refreshes if not whole] == [0]  # in training, the target refreshed at the first step only
    steps = counter.per_step()
    assert len(steps) == 8
    # The first step besides: the per-sample loss check (1), the target refresh (6 samples in batches of 4: 2) and the
    # first-step check's recomputation (1).
    assert steps[0] == forwards + 4, steps
    assert steps[1:] == [forwards] * 7, steps


def test_the_end_of_fit_drift_pass_runs_through_the_capture_once_per_training_batch(tmp_path, tiny_data, monkeypatch):
    """The drift correction's pass over the training set uses the fast engine: one products-only capture pass per
    batch (16 samples in batches of 4), and no torch.func forward-mode product."""
    from diffin_lightning import per_sample
    from diffin_lightning.dots import functional
    from diffin_lightning.recorder import InfluenceRecorder

    calls = {"recaptured": [], "jvp": 0, "drift": False}
    original_recaptured, original_drift = InfluenceRecorder._recaptured, InfluenceRecorder._compute_drift

    def recaptured(self, *args, **kwargs):
        if calls["drift"]:
            calls["recaptured"].append(kwargs.get("products_only", False))
        return original_recaptured(self, *args, **kwargs)

    def compute_drift(self, *args, **kwargs):
        calls["drift"] = True
        try:
            return original_drift(self, *args, **kwargs)
        finally:
            calls["drift"] = False

    def counted(jvp):
        def wrapper(*args, **kwargs):
            calls["jvp"] += calls["drift"]
            return jvp(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(InfluenceRecorder, "_recaptured", recaptured)
    monkeypatch.setattr(InfluenceRecorder, "_compute_drift", compute_drift)
    monkeypatch.setattr(per_sample, "jvp", counted(per_sample.jvp))
    monkeypatch.setattr(functional, "jvp", counted(functional.jvp))
    callback = DiffInCallback(targets={"val": tiny_data.val}, eps=EPS)
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback.influence.metadata["propagated_drift_included"]
    assert calls["recaptured"] == [True] * 4, calls
    assert calls["jvp"] == 0
