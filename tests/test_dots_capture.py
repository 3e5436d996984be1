"""LayerCapture: micro-batches, shared and tied weights, covered + fallback totals, whole models (float64)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from diffin_lightning.dots import LayerCapture, functional_dots, functional_squared_norms
from dots_reference import TOLERANCE, captured, check_against_reference, per_sample_gradients_by_loop, rows_of as _which


class SharedSequenceModel(nn.Module):
    """Per-position Linear layers, one of them called twice (shared weights), a conv, a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.shared = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # [B, T, 6]
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(h).mean(1))


def test_two_micro_batches_and_a_shared_layer():
    torch.manual_seed(0)
    model = SharedSequenceModel().double()
    targets = torch.randint(0, 4, (8,))
    inputs = torch.randn(8, 5, 3, dtype=torch.float64)
    def losses(x):
        return F.cross_entropy(model(x), targets[_which(inputs, x)], reduction="none")

    names = [n for n, _ in model.named_parameters()]
    capture, per_sample = captured(model, losses, [inputs[:5], inputs[5:]], names)
    assert capture.covered_parameter_names == tuple(names)
    assert per_sample.batch_sizes == [5, 3] and per_sample.sample_count == 8
    reference = per_sample_gradients_by_loop(model, losses, inputs, names)
    check_against_reference(per_sample, reference)
    # The step's own .grad is the average of the two micro-batches' means.
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.grad, (reference[name][:5].sum(0) / 5 + reference[name][5:].sum(0) / 3) / 2, **TOLERANCE)
    # gradient_dots with G_sum handed over (as a caller would from .grad of a sum) agrees with the Gram form.
    given = {name: reference[name].sum(0) for name, _ in model.named_parameters()}
    torch.testing.assert_close(per_sample.gradient_dots(form="direct", gradient=given), per_sample.gradient_dots(form="gram"), **TOLERANCE)


class RawScale(nn.Module):
    """A module outside the registry: a raw parameter used in a custom forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.scale + 0.1 * self.scale.pow(2)


class MixedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.raw = RawScale(5)
        self.second = nn.Linear(5, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.raw(self.first(x))))


@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
def test_covered_plus_fallback_totals_are_exact(method):
    torch.manual_seed(0)
    model = MixedModel().double()
    inputs, targets = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))

    def losses(x):
        return F.cross_entropy(model(x), targets[_which(inputs, x)], reduction="none")

    names = [n for n, _ in model.named_parameters()]
    capture, per_sample = captured(model, losses, [inputs], names)
    assert capture.uncovered_parameter_names == ("raw.scale",)
    assert "RawScale" in capture.uncovered_reasons["raw.scale"]
    reference = per_sample_gradients_by_loop(model, losses, inputs, names)
    flat = torch.cat([reference[n].flatten(1) for n in names], dim=1)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_vector(p):
        return F.cross_entropy(functional_call(model, p, (inputs,)), targets, reduction="none")

    directions = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(2)]
    total = per_sample.dots(directions) + functional_dots(loss_vector, params, directions, only=capture.uncovered_parameter_names, method=method)
    expected = torch.stack([flat @ torch.cat([d[n].flatten() for n in names]) for d in directions])
    tolerance = TOLERANCE if method == "jvp" else {"rtol": 1e-7, "atol": 1e-9}
    torch.testing.assert_close(total, expected, **tolerance)
    # <G_sum, G_i>: the covered part from the capture, the uncovered part along G_sum restricted to it.
    summed = {n: reference[n].sum(0) for n in names}
    total_gradient_dots = per_sample.gradient_dots() + functional_dots(loss_vector, params, [summed], only=capture.uncovered_parameter_names, method=method)[0]
    torch.testing.assert_close(total_gradient_dots, flat @ flat.sum(0), **tolerance)
    norms = per_sample.squared_norms() + functional_squared_norms(
        lambda p, batch: F.cross_entropy(functional_call(model, p, (batch["x"],)), batch["y"], reduction="none"),
        params,
        {"x": inputs, "y": targets},
        only=capture.uncovered_parameter_names,
    )
    torch.testing.assert_close(norms, flat.pow(2).sum(1), **TOLERANCE)


class TiedLanguageModel(nn.Module):
    """An Embedding whose table is also the output layer's weight (GPT-2's wte / lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.embed.weight

    def losses(self, ids):
        logits = self.head(torch.tanh(self.mix(self.embed(ids))))
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten(), reduction="none").view(ids.shape).mean(1)


def test_weight_tied_between_embedding_and_linear():
    torch.manual_seed(0)
    model = TiedLanguageModel().double()
    ids = torch.randint(0, 9, (5, 4))
    ids[1, 0] = 0
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names  # named_parameters lists a tied parameter once
    capture, per_sample = captured(model, model.losses, [ids], names)
    assert capture.covered_parameter_names == tuple(names)
    check_against_reference(per_sample, per_sample_gradients_by_loop(model, model.losses, ids, names))


def test_a_parameter_also_owned_by_a_module_without_rule_is_uncovered():
    linear = nn.Linear(3, 3)
    raw = RawScale(3)
    raw.scale = linear.bias  # the bias is used both inside the Linear and by a module no rule covers
    model = nn.Sequential(linear, raw)
    capture = LayerCapture(model)
    assert capture.covered_parameter_names == ("0.weight",)
    assert capture.uncovered_parameter_names == ("0.bias",)


def test_disabled_capture_keeps_nothing_and_remove_detaches_hooks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    capture = LayerCapture(model)
    model(torch.randn(5, 3)).sum().backward()
    assert capture.per_sample().sample_count == 0
    with capture.recording():
        model(torch.randn(5, 3)).sum().backward()
    assert capture.per_sample().sample_count == 5
    model(torch.randn(7, 3)).sum().backward()  # after recording: ignored
    assert capture.per_sample().sample_count == 5
    with torch.no_grad(), capture.recording():
        model(torch.randn(5, 3))
    assert capture.per_sample().sample_count == 0
    capture.remove()
    assert all(not layer._forward_hooks for layer in model)


def test_a_forward_without_backward_is_dropped_and_sample_axis_mismatch_is_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with LayerCapture(model) as capture:
        with capture.recording():
            model(torch.randn(5, 3)).sum().backward()
            model(torch.randn(6, 3))  # e.g. a logged forward that never reaches a backward
        assert capture.per_sample().batch_sizes == [5]
    assert capture.per_sample().sample_count == 0  # leaving the `with` removed the hooks and the captures

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):  # x [B, T, 3]; b sees [T, B, 3]
            return self.b(self.a(x).transpose(0, 1))

    model = SequenceFirst()
    with LayerCapture(model) as capture, capture.recording():
        model(torch.randn(4, 2, 3)).sum().backward()
        with pytest.raises(ValueError, match="batch-first"):
            capture.per_sample()


def _gpt2(dtype, width: int = 32, heads: int = 2, vocab: int = 50, device: str = "cpu"):
    """A small Hugging Face GPT-2 without dropout (its SDPA attention, its Conv1D projections); tests/test_gpu.py uses it too."""
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device, dtype)


def _sequence_losses(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1).mean(1)


def test_gpt2_every_parameter_from_the_registry():
    model = _gpt2(torch.float64)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 50, (6, 10))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    capture, per_sample = captured(model, lambda x: _sequence_losses(model, x), [ids[:4], ids[4:]], names)
    assert capture.uncovered_parameter_names == ()
    check_against_reference(per_sample, per_sample_gradients_by_loop(model, lambda x: _sequence_losses(model, x), ids, names), directions=2)


def _encoder(dropout: float, dtype):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=dropout, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(16, 3)}).to(dtype)
    return model


def _encoder_losses(model, x, targets):
    return F.cross_entropy(model["head"](model["encoder"](x).mean(1)), targets, reduction="none")


def test_transformer_encoder_every_parameter_from_the_registry():
    model = _encoder(0.0, torch.float64)
    x, targets = torch.randn(6, 5, 16, dtype=torch.float64), torch.randint(0, 3, (6,))
    losses = lambda inputs: _encoder_losses(model, inputs, targets[_which(x, inputs)])
    names = [n for n, _ in model.named_parameters()]
    capture, per_sample = captured(model, losses, [x], names)
    assert capture.uncovered_parameter_names == ()
    check_against_reference(per_sample, per_sample_gradients_by_loop(model, losses, x, names), directions=2)


def test_transformer_encoder_with_attention_dropout_uses_the_fallback_under_flash_attention(caplog):
    """float32 on CPU runs SDPA's flash kernel, which has no forward-mode AD: "auto" falls back to finite differences."""
    model = _encoder(0.1, torch.float32).eval()  # eval: dropout off, but the rule still declines dropout > 0
    x, targets = torch.randn(6, 5, 16), torch.randint(0, 3, (6,))
    names = [n for n, _ in model.named_parameters()]
    capture = LayerCapture(model)
    uncovered = capture.uncovered_parameter_names
    assert uncovered and all("self_attn" in name for name in uncovered)
    assert "dropout" in capture.uncovered_reasons[uncovered[0]]
    with capture.recording():
        _encoder_losses(model, x, targets).mean().backward()
    per_sample = capture.per_sample(backprop_scale=6)
    params = {n: p.detach() for n, p in model.named_parameters()}
    directions = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="diffin_lightning.dots"):
        fallback = functional_dots(lambda p: _encoder_losses(_FunctionalModel(model, p), x, targets), params, directions, only=uncovered)
    total = per_sample.dots(directions) + fallback
    # Reference in float64, every parameter, per-sample loop.
    reference_model = _encoder(0.1, torch.float64).eval()
    reference_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x64 = x.double()
    reference = per_sample_gradients_by_loop(reference_model, lambda inputs: _encoder_losses(reference_model, inputs, targets[_which(x64, inputs)]), x64, names)
    flat = torch.cat([reference[n].flatten(1) for n in names], dim=1)
    expected = torch.stack([flat @ torch.cat([d[n].double().flatten() for n in names]) for d in directions])
    scale = expected.abs().max()
    assert (total.double() - expected).abs().max() <= 2e-3 * scale
    assert not _jvp_works(model, x, targets, params, uncovered)
    assert any("finite differences" in record.getMessage() and "encoder.layers.0.self_attn" in record.getMessage() for record in caplog.records)


class _FunctionalModel(dict):
    """Indexing by key returns the submodule called with swapped parameters (keeps `_encoder_losses` unchanged)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def __getitem__(self, key):
        module = self.model[key]
        prefix = f"{key}."
        sub = {n[len(prefix):]: v for n, v in self.params.items() if n.startswith(prefix)}
        return lambda *args: functional_call(module, sub, args)


def _jvp_works(model, x, targets, params, uncovered):
    try:
        functional_dots(lambda p: _encoder_losses(_FunctionalModel(model, p), x, targets), params, [params], only=uncovered, method="jvp")
        return True
    except (NotImplementedError, RuntimeError) as error:
        if "forward AD" not in str(error):  # only the kernel's missing forward-mode AD, not any other failure
            raise
        return False


def test_captures_are_freed_by_reference_counting_not_left_to_the_garbage_collector():
    """A reference cycle through a hooked output kept every step's activations alive until gc ran (+200 MB)."""
    import gc

    from diffin_lightning.dots import capture as capture_module

    # An encoder layer too: self-attention's node hook (inner_gradients) must not close a cycle either.
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True), nn.Linear(8, 3)
    )
    capture = LayerCapture(model)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            with capture.recording():
                model(torch.randn(6, 5, 4)).pow(2).sum().backward()
            capture.per_sample(backprop_scale=1.0).dots([{n: torch.ones_like(p) for n, p in model.named_parameters()}])
            capture.clear()
        alive = sum(isinstance(obj, capture_module._Pass) for obj in gc.get_objects())
    finally:
        if was_enabled:
            gc.enable()
        capture.remove()
    assert alive == 0


class _Residual(nn.Module):
    """Two covered layers whose outputs are added: autograd hands both one gradient tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.first(x) + self.second(x)))


def test_in_place_scaling_scales_a_shared_gradient_once_and_never_another_captures():
    torch.manual_seed(0)
    model = _Residual().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    mine, other = LayerCapture(model), LayerCapture(model)  # two callbacks on one model see the same gradients
    with mine.recording(), other.recording():
        F.cross_entropy(model(x), y).backward()
    first_call, second_call = (next(c for c in mine._passes[0].calls if c.module_name == n) for n in ("first", "second"))
    assert first_call.backprops[0].untyped_storage().data_ptr() == second_call.backprops[0].untyped_storage().data_ptr()
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    expected = other.per_sample(backprop_scale=6.0).dots([direction])  # copies: other's capture stays readable
    scaled = mine.per_sample(backprop_scale=6.0, in_place=True).dots([direction])
    torch.testing.assert_close(scaled, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(other.per_sample(backprop_scale=6.0).dots([direction]), expected, rtol=1e-12, atol=1e-14)
    names = [name for name, _ in model.named_parameters()]
    reference = per_sample_gradients_by_loop(model, lambda ids: F.cross_entropy(model(x[ids]), y[ids], reduction="none"), torch.arange(6), names)
    exact = torch.stack([sum((direction[n] * reference[n][i]).sum() for n in direction) for i in range(6)])
    torch.testing.assert_close(expected[0], exact, **TOLERANCE)
    mine.remove(), other.remove()
    assert not any(LayerCapture._holders[b.untyped_storage().data_ptr()] for b in first_call.backprops if b is not None)


def test_a_convolution_is_unfolded_only_by_a_form_that_reads_its_patches():
    """The cost model read a partner's unfolded patches for their count: every f_i of a CNN unfolded
    its convolutions (B L k numbers held; 0.8x of a plain fit and a third of the peak on the bundled
    CNN) even where the direct form, one convolution with the directions as filters, was chosen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()
    capture = LayerCapture(model)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    with capture.recording():
        model(x).pow(2).sum().backward()
    dots = capture.per_sample(backprop_scale=1.0)
    (conv,) = [block for block in dots.passes[0] if block.key == ("0", "conv")]
    assert conv.cost("gram", "gram", other=conv) > 0
    assert conv._columns is None  # pricing the Gram form did not unfold
    direct = dots.gradient_dots(form="direct")
    assert conv._columns is None  # nor did the direct form
    gram = dots.gradient_dots(form="gram")
    assert conv._columns is not None  # the Gram form reads the patches
    torch.testing.assert_close(direct, gram, rtol=1e-10, atol=0)
    capture.remove()


def test_normalisation_layers_form_their_factors_during_the_backward_and_let_their_tensors_go():
    """Eager rules (LayerNorm, RMSNorm, GroupNorm): per-sample gradients formed as each output gradient
    arrives, rescaled later like the others; the call then holds neither its input nor its gradient."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 6), nn.RMSNorm(6), nn.Linear(6, 3)).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    losses = lambda inputs: model(inputs).pow(2).sum(dim=(1, 2))
    names = [n for n, _ in model.named_parameters()]
    capture = LayerCapture(model, names)
    with capture.recording():
        (losses(x).mean() / 2).backward()  # scaled by 2 B below: the eager factors are rescaled after the fact
    norms = [call for call in capture._passes[0].calls if call.module_name in ("1", "4")]
    assert len(norms) == 2 and all(call.activations is None and call.backprops == [None] and call.eager_factors for call in norms)
    check_against_reference(capture.per_sample(backprop_scale=2 * x.shape[0]), per_sample_gradients_by_loop(model, losses, x, names))
    capture.remove()


def test_a_second_gradient_through_an_eager_layer_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).double()
    with LayerCapture(model) as capture:
        with capture.recording():
            out = model(torch.randn(2, 3, dtype=torch.float64)).sum()
            out.backward(retain_graph=True)
            with pytest.raises(RuntimeError, match="retain_graph=True.*Fix"):
                out.backward()


def test_a_single_product_view_keeps_no_materialised_gradients():
    """keep_materialised=False (the end-of-fit pass's views): each layer's per-sample gradients go once its
    product is taken; the numbers are the cached path's."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    directions = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    results = {}
    for keep in (True, False):
        capture = LayerCapture(model)
        with capture.recording():
            model(x).pow(2).sum().backward()
        per_sample = capture.per_sample()
        per_sample.keep_materialised = keep
        results[keep] = per_sample.dots(directions, form="materialised")
        assert bool(per_sample._materialised) == keep
        capture.remove()
    torch.testing.assert_close(results[False], results[True], rtol=0, atol=0)
