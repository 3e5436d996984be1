"""Products taken during the backward (ProductStream) against the same products from held captures, in float64."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffin_lightning import DiffInCallback
from diffin_lightning.dots import LayerCapture
from diffin_lightning.dots import stream as stream_module
from diffin_lightning.dots.stream import ProductStream
from helpers import TinyClassifier, TinyData, captured_model, trainer


@pytest.fixture(autouse=True)
def stream_every_layer(monkeypatch):
    """These models' layers are far below the size a stream takes alone by default: take them all here."""
    monkeypatch.setattr(stream_module, "DEFAULT_MIN_STREAMED_ELEMENTS", 0)


class TokenModel(nn.Module):
    """Every kind of call: taken (sequence Linear; attention once its in-projection's gradient, its last, arrived),
    eager (LayerNorm), called twice, tied."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.up = nn.Linear(8, 64)
        self.norm = nn.LayerNorm(64)
        self.twice = nn.Linear(64, 64)
        self.down = nn.Linear(64, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 11)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.norm(self.up(self.embed(tokens))))
        hidden = torch.tanh(self.twice(torch.tanh(self.twice(hidden))))
        hidden = self.down(hidden)
        hidden = hidden + self.attention(hidden, hidden, hidden, need_weights=False)[0]
        return self.head(hidden).mean(1)


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 5 * 5, 40)
        self.out = nn.Linear(40, 11)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.head(torch.tanh(self.conv(images)).flatten(1))))


def _inputs(model: nn.Module, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TokenModel):
        return torch.randint(0, 11, (batch, 5), generator=g)
    if isinstance(model, nn.Sequential):
        return torch.randn(batch, 5, generator=g, dtype=torch.float64)
    return torch.randn(batch, 2, 5, 5, generator=g, dtype=torch.float64)


def _loss(model: nn.Module, inputs: torch.Tensor, seed: int) -> torch.Tensor:
    labels = torch.randint(0, 11, (inputs.shape[0],), generator=torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(inputs), labels, reduction="none")


def _captured(model, directions, stream, batches=((4, 0),), scales=None):
    """Forward+backward of each (batch size, seed) micro-batch of the mean loss with the capture (and the stream) on."""
    capture = LayerCapture(model)
    model.zero_grad(set_to_none=True)
    with capture.recording():
        capture.stream_products(stream)
        for size, seed in batches:
            _loss(model, _inputs(model, size, seed), seed).mean().backward()
    calls = [call for current in capture._passes for call in current.calls]
    taken = [call.module_name for call in calls if call.streamed]
    # A taken call holds nothing once the backward is over; a held one holds its inputs.
    assert all(call.activations is None and all(b is None for b in call.backprops) for call in calls if call.streamed)
    per_sample = capture.per_sample(backprop_scale=scales if scales is not None else [float(size) for size, _ in batches])
    gradient = {name: p.grad.clone() for name, p in model.named_parameters()}
    capture.remove()
    return per_sample, gradient, taken


@pytest.mark.parametrize("make", [TokenModel, ConvModel], ids=["tokens", "conv"])
@pytest.mark.parametrize(
    "gradient_dots, source",
    [(False, "gram"), (True, "gram"), (True, "accumulated"), (True, "factors")],
    ids=["dots+norms", "gram-only", "G_sum-from-grad", "G_sum-from-factors"],
)
def test_streamed_products_equal_the_held_ones(make, gradient_dots, source):
    torch.manual_seed(0)
    model = make().double()
    directions = tuple({n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2))
    held, gradient, none_taken = _captured(model, directions, None)
    stream = ProductStream(directions=directions, squared_norms=True, gradient_dots=gradient_dots, gradient_source=source, second_order=True)
    streamed, _, taken = _captured(model, directions, stream)
    assert not none_taken
    gram_only = gradient_dots and source == "gram"
    if make is TokenModel:
        # Called twice or tied with another module: held. With <G_sum, G_i> asked and no G_sum to read, the
        # sequence layers' direct form (cheaper here than the Gram form over B*T positions) is held too; with
        # .grad to read they are taken once it has accumulated.
        assert set(taken) == (set() if gram_only else {"up", "down", "attention"})
    else:
        assert set(taken) == ({"head", "out"} if gram_only else {"conv", "head", "out"})  # the convolution: direct form
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(streamed.dots(list(directions)), held.dots(list(directions)), **close)
    # Any order and any subset of the stream's directions (a target dropped for a non-finite g_V).
    torch.testing.assert_close(streamed.dots([directions[1]]), held.dots([directions[1]]), **close)
    torch.testing.assert_close(streamed.squared_norms(), held.squared_norms(), **close)
    assert streamed.gram_form_parameters() == held.gram_form_parameters()
    if gradient_dots:
        expected = held.gradient_dots(gradient=gradient, gradient_scale=4.0)
        torch.testing.assert_close(streamed.gradient_dots(gradient=gradient, gradient_scale=4.0), expected, **close)
    else:
        with pytest.raises(RuntimeError, match="gradient_dots was not taken"):
            streamed.gradient_dots(gradient=gradient, gradient_scale=4.0)


def test_streamed_micro_batches_with_their_own_scales():
    torch.manual_seed(0)
    model = ConvModel().double()
    directions = ({n: torch.randn_like(p) for n, p in model.named_parameters()},)
    batches, scales = ((4, 0), (3, 1)), [8.0, 6.0]  # accumulation over two micro-batches: k * |b| each
    held, _, _ = _captured(model, directions, None, batches, scales)
    streamed, _, taken = _captured(model, directions, ProductStream(directions=directions, squared_norms=True), batches, scales)
    assert taken.count("conv") == 2
    torch.testing.assert_close(streamed.dots(list(directions)), held.dots(list(directions)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(streamed.squared_norms(), held.squared_norms(), rtol=1e-10, atol=1e-12)


def test_what_a_stream_did_not_take_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = ConvModel().double()
    directions = ({n: torch.randn_like(p) for n, p in model.named_parameters()},)
    streamed, _, _ = _captured(model, directions, ProductStream(directions=directions))
    other = {n: v.clone() for n, v in directions[0].items()}  # equal values, another dictionary
    with pytest.raises(RuntimeError, match=r"directions\[0\]` is not one of the directions given to the ProductStream"):
        streamed.dots([other])
    with pytest.raises(RuntimeError, match="squared_norms was not taken"):
        streamed.squared_norms()
    with pytest.raises(RuntimeError, match="per_sample_gradients: .* Fix: capture the step without a stream"):
        streamed.per_sample_gradients()


def test_a_second_backward_through_a_streamed_call_raises():
    model = ConvModel().double()
    directions = ({n: torch.randn_like(p) for n, p in model.named_parameters()},)
    capture = LayerCapture(model)
    with capture.recording():
        capture.stream_products(ProductStream(directions=directions))
        loss = _loss(model, _inputs(model, 3, 0), 0).mean()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="stream_products=False"):
            loss.backward()
    capture.remove()


class WideClassifier(TinyClassifier):
    """A middle layer whose <G_B, G_i> takes the Gram form at batch 4 (taken), outer ones that do not (held)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


@pytest.mark.parametrize(
    "options",
    [dict(compute_second_order=False), dict(), dict(finite_difference="central"), dict(compute_second_order=False, accumulate=2)],
    ids=["first-order", "forward", "central", "first-order-accumulated"],
)
def test_the_callback_scores_are_the_same_with_and_without_the_stream(tmp_path, monkeypatch, options):
    """A dataset target refreshed every 2 steps (before the step's forward when streamed) and the self target."""
    options = dict(options)
    accumulate = options.pop("accumulate", 1)
    data = TinyData.make(num_train=16, num_val=6, seed=3)
    taken = []
    original = LayerCapture._take
    monkeypatch.setattr(LayerCapture, "_take", staticmethod(lambda *args: taken.append(original(*args)) or taken[-1]))
    runs = {}
    for stream in (True, False):
        taken.clear()
        callback = DiffInCallback(
            targets={"val": data.val, "self": "self"}, eps=1e-6, target_refresh_every_n_steps=2, stream_products=stream, **options
        )
        trainer(default_root_dir=tmp_path / str(stream), max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[callback]).fit(
            WideClassifier().double(), data.loader(batch_size=4)
        )
        assert callback._recorder.use_capture
        runs[stream] = (callback, any(taken))
    assert runs[True][1] and not runs[False][1]
    for name in ("val", "self"):
        for component in ("first_order", "second_order", "diffin", "visits"):
            expected = runs[False][0].influence[name].component(component)
            torch.testing.assert_close(runs[True][0].influence[name].component(component), expected, rtol=1e-9, atol=1e-12 * expected.abs().max())


def test_no_stream_where_the_direction_needs_the_step_itself(tmp_path, monkeypatch):
    """A 'train' target folds this step's gradient into its direction: the training step's captures are all held.

    (Its perturbed passes and the end-of-fit pass, whose directions are known before their backward, still stream.)
    """
    from diffin_lightning.recorder import InfluenceRecorder

    data = TinyData.make(num_train=12, num_val=6, seed=3)
    training_step_streams, streams = [], []
    product_stream = InfluenceRecorder._product_stream
    monkeypatch.setattr(InfluenceRecorder, "_product_stream", lambda self, *a: training_step_streams.append(product_stream(self, *a)) or training_step_streams[-1])
    original = LayerCapture.stream_products
    monkeypatch.setattr(LayerCapture, "stream_products", lambda self, stream: streams.append(stream) or original(self, stream))
    callback = DiffInCallback(targets={"val": data.val, "train": "train"}, eps=1e-6)
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(WideClassifier().double(), data.loader(batch_size=4))
    assert training_step_streams and all(stream is None for stream in training_step_streams)
    assert any(stream is not None and stream.along is not None for stream in streams)


def _wide() -> nn.Module:
    """Every layer's <G_sum, G_i> in the Gram form at batch 4: the held pass, too, computes no weight gradient."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 11))


@pytest.mark.parametrize("make", [TokenModel, ConvModel, _wide], ids=["tokens", "conv", "wide"])
def test_a_streamed_perturbed_pass_equals_the_held_one_and_forms_only_the_held_layers_gradients(make):
    """<s, G_B> and f_i at theta + shift with every layer taken during the backward, against the pass that holds them.

    Autograd forms a parameter gradient only for the layers a stream cannot take alone (tied,
    called twice); the others' G_sum (attention's too), where their form reads it, is built from
    their factors.
    """
    from diffin_lightning.engine import CapturedStep, RecomputedStep, ScaledShift, capture_pass

    torch.manual_seed(0)
    model = make().double()
    inputs = _inputs(model, 4, 0)
    labels = torch.randint(0, 11, (4,), generator=torch.Generator().manual_seed(1))
    loss, names, params, capture, micro_batches = captured_model(model, inputs, labels)
    direction = {name: torch.randn_like(p) for name, p in params.items()}
    shift = ScaledShift(direction, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64))
    computed: list[str] = []
    for name, parameter in model.named_parameters():
        parameter.register_hook(lambda grad, name=name: computed.append(name))
    results = {}
    for streamed in (False, True):
        gradient, per_sample = capture_pass(capture, loss, names, None, micro_batches)
        gradient = {name: value / 4 for name, value in gradient.items()}
        step = CapturedStep(capture, loss, params, micro_batches, per_sample, gradient, stream_perturbed=streamed)
        step.release_theta()
        computed.clear()
        results[streamed] = step.perturbed_along(shift, shift.negated())
        formed = set(computed)
    held = {"embed.weight", "head.bias", "twice.weight", "twice.bias"} if make is TokenModel else set()
    assert formed == held, formed
    for mine, reference in zip(results[True], results[False]):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-14)
    if make is not TokenModel:  # against torch.func (the held pass above shares the capture code)
        recomputed = RecomputedStep(loss, params, [(inputs, labels)], 4).perturbed_along(shift, shift.negated())
        for mine, reference in zip(results[True], recomputed):
            torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-14)
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    capture.remove()


def test_small_layers_are_held_even_with_a_stream(monkeypatch):
    """Below min_elements a layer's products come with the held layers' (one call), at the same values."""
    torch.manual_seed(0)
    model = ConvModel().double()
    directions = ({n: torch.randn_like(p) for n, p in model.named_parameters()},)
    held, _, _ = _captured(model, directions, None)
    # conv's output holds 4 * 4 * 5 * 5 = 400 elements, head's 4 * 40 = 160, out's 4 * 11 = 44.
    stream = ProductStream(directions=directions, squared_norms=True, min_elements=160)
    streamed, _, taken = _captured(model, directions, stream)
    assert set(taken) == {"conv", "head"}
    torch.testing.assert_close(streamed.dots(list(directions)), held.dots(list(directions)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(streamed.squared_norms(), held.squared_norms(), rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(stream_module, "DEFAULT_MIN_STREAMED_ELEMENTS", 1 << 17)
    assert ProductStream().min_elements == 1 << 17
    _, _, none_taken = _captured(model, directions, ProductStream(directions=directions))
    assert none_taken == []


class _Classifier(TinyClassifier):
    """One of the models above under Lightning; ``regularised``: training_step adds a penalty with a different
    weight on every parameter, so the check fails by an amount every parameter's gradient enters."""

    def __init__(self, net: nn.Module, regularised: bool = False) -> None:
        super().__init__()
        self.net = net
        self.regularised = regularised

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        if self.regularised:
            loss = loss + sum(0.01 * (k + 1) * p.pow(2).sum() for k, p in enumerate(self.parameters()))
        return loss


@pytest.mark.parametrize("regularised", [False, True], ids=["mean", "regularised"])
@pytest.mark.parametrize("options", [dict(compute_second_order=False), dict()], ids=["first-order", "diffin"])
@pytest.mark.parametrize("make", [TokenModel, ConvModel, _wide], ids=["tokens", "conv", "wide"])
def test_the_first_step_check_without_a_recomputed_gradient_reads_what_the_full_recomputation_reads(tmp_path, monkeypatch, make, options, regularised):
    """The check's gradient gap and products, each taken layer's G_sum compared and let go during the backward,
    against a recomputation that holds every gradient (taken, held, tied, twice-called, eager and attention layers)."""
    from torch.utils.data import TensorDataset

    from diffin_lightning.engine import relative_difference
    from diffin_lightning.recorder import InfluenceRecorder

    checks = []
    original = InfluenceRecorder._streamed_check

    def with_full_recomputation(self, view, stream, forward_context):
        gap, expected = original(self, view, stream, forward_context)
        full = self._recaptured(view.params, view.micro_batches, forward_context, self.unseeded_loss)  # every gradient from autograd
        # Every kind of product the stream took, in the check's order (<G_B, G_i>, the directions', |G_i|^2).
        reference = [full.gradient_dots()] if stream.gradient_dots else []
        reference += [full.dots(list(stream.directions))] if stream.directions else []
        reference += [full.squared_norms()] if stream.squared_norms or not reference else []
        checks.append((gap, relative_difference(view.batch_gradient, full.batch_gradient), expected, reference))
        return gap, expected

    monkeypatch.setattr(InfluenceRecorder, "_streamed_check", with_full_recomputation)
    # (A model with attention takes the full recomputation by default, see the next test; its layers are checked here too.)
    monkeypatch.setattr(LayerCapture, "keeps_whole_outputs", property(lambda self: False))
    model = make().double()
    inputs = _inputs(model, 22, seed=5)
    labels = torch.randint(0, 11, (22,), generator=torch.Generator().manual_seed(6))
    data = TinyData(TensorDataset(inputs[:16], labels[:16]), TensorDataset(inputs[16:], labels[16:]))
    callback = DiffInCallback(targets={"val": data.val}, eps=1e-6, **options)
    with pytest.warns(UserWarning, match="differs from the gradient of the mean") if regularised else contextlib.nullcontext():
        trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(_Classifier(model, regularised), data.loader(batch_size=4))
    assert len(checks) == 1
    gap, full_gap, expected, reference = checks[0]
    assert gap == pytest.approx(full_gap, rel=1e-9, abs=1e-13)
    assert (gap > 1e-6) == regularised
    assert len(expected) == len(reference) >= 1
    for taken, full_products in zip(expected, reference):
        torch.testing.assert_close(taken, full_products, rtol=1e-9, atol=1e-12 * float(full_products.abs().max()))
    assert callback._recorder.use_capture == (not regularised)


@pytest.mark.parametrize(("make", "streamed"), [(TokenModel, False), (ConvModel, True)], ids=["attention", "conv"])
def test_the_first_step_check_recomputes_the_whole_gradient_where_a_pass_would_keep_attention_outputs_whole(tmp_path, monkeypatch, make, streamed):
    """Attention's outputs go to the backward whole (not as 0-d probes): their gradients would stand in for the
    parameter-sized one, so a model with attention keeps the full recomputation."""
    from torch.utils.data import TensorDataset

    from diffin_lightning.recorder import InfluenceRecorder

    calls = []
    original = InfluenceRecorder._streamed_check
    monkeypatch.setattr(InfluenceRecorder, "_streamed_check", lambda self, *args: calls.append(1) or original(self, *args))
    model = make().double()
    inputs = _inputs(model, 22, seed=5)
    labels = torch.randint(0, 11, (22,), generator=torch.Generator().manual_seed(6))
    data = TinyData(TensorDataset(inputs[:16], labels[:16]), TensorDataset(inputs[16:], labels[16:]))
    callback = DiffInCallback(targets={"val": data.val}, eps=1e-6, compute_second_order=False)
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(_Classifier(model), data.loader(batch_size=4))
    assert callback._recorder.capture.layers.keeps_whole_outputs == (not streamed)
    assert bool(calls) == streamed and callback._recorder.use_capture
