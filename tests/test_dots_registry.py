"""Every layer rule against per-sample gradients by a loop over samples (float64), in every form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffin_lightning.dots import LayerCapture, rule_for, supported_layer_types
from diffin_lightning.engine import StepCapture
from dots_reference import captured, check_against_reference, per_sample_gradients_by_loop


class Probe(nn.Module):
    """One layer, then a fixed nonlinear per-sample loss of its output: ``l_i = sum(w * tanh(out_i) + out_i^2 / 2)``."""

    def __init__(self, layer: nn.Module, output_shape: tuple[int, ...], call=None) -> None:
        super().__init__()
        self.layer = layer
        self.call = call or (lambda layer, x: layer(x))
        self.register_buffer("weights", torch.randn(output_shape, dtype=torch.float64))

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        out = self.call(self.layer, x)
        return (self.weights * torch.tanh(out) + out.pow(2) / 2).flatten(1).sum(1)


def _run(layer: nn.Module, inputs: torch.Tensor, call=None, micro_batches: int = 1) -> None:
    layer = layer.double()
    probe_inputs = inputs[:1]
    out = (call or (lambda module, x: module(x)))(layer, probe_inputs)
    probe = Probe(layer, tuple(out.shape[1:]), call)
    names = [name for name, value in probe.named_parameters() if value.requires_grad]
    capture, per_sample = captured(probe, probe.losses, list(inputs.chunk(micro_batches)), names)
    assert capture.covered_parameter_names == tuple(names), capture.uncovered_reasons
    reference = per_sample_gradients_by_loop(probe, probe.losses, inputs, names)
    check_against_reference(per_sample, reference)
    capture.remove()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("positions", [None, 1, 3])
def test_linear(bias, positions):
    torch.manual_seed(0)
    shape = (5, 4) if positions is None else (5, positions, 4)
    _run(nn.Linear(4, 3, bias=bias), torch.randn(shape, dtype=torch.float64))


def test_linear_with_two_position_dims_and_frozen_bias():
    torch.manual_seed(1)
    layer = nn.Linear(4, 3)
    layer.bias.requires_grad_(False)
    _run(layer, torch.randn(4, 2, 3, 4, dtype=torch.float64))


CONV2D_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(2, 3), dilation=2, padding=(1, 2)),
    dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="circular", stride=2),
]


@pytest.mark.parametrize("options", CONV2D_CASES, ids=[str(c) for c in CONV2D_CASES])
def test_conv2d(options):
    torch.manual_seed(0)
    _run(nn.Conv2d(4, 6, **options), torch.randn(5, 4, 7, 6, dtype=torch.float64))


CONV1D_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=2, dilation=3, groups=2),
    dict(kernel_size=4, padding="same"),
    # Non-zero padding modes pad the input before the convolution: the rule must see the padded input.
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular", stride=2, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize("options", CONV1D_CASES, ids=[str(c) for c in CONV1D_CASES])
def test_conv1d(options):
    torch.manual_seed(0)
    _run(nn.Conv1d(4, 6, **options), torch.randn(5, 4, 9, dtype=torch.float64))


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_embedding(padding_idx):
    torch.manual_seed(0)
    indices = torch.randint(0, 7, (6, 4))
    indices[0, :2] = 3  # a repeated row within one sample: its gradient adds up
    layer = nn.Embedding(7, 5, padding_idx=padding_idx)
    # The loop reference slices the index tensor; Probe's call reads it directly.
    _run(layer, indices)


@pytest.mark.parametrize("elementwise_affine,bias", [(True, True), (True, False)])
def test_layer_norm(elementwise_affine, bias):
    torch.manual_seed(0)
    layer = nn.LayerNorm(6, elementwise_affine=elementwise_affine, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
    _run(layer, torch.randn(5, 3, 6, dtype=torch.float64))


def test_layer_norm_over_two_dims_on_flat_inputs():
    torch.manual_seed(0)
    _run(nn.LayerNorm((2, 3)), torch.randn(4, 2, 3, dtype=torch.float64))


def test_rms_norm():
    torch.manual_seed(0)
    _run(nn.RMSNorm(6), torch.randn(5, 3, 6, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(5, 6, 3, 4), (5, 6)])
def test_group_norm(shape):
    torch.manual_seed(0)
    layer = nn.GroupNorm(3, 6)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    _run(layer, torch.randn(shape, dtype=torch.float64))


def _self_attention(layer, x):
    return layer(x, x, x, need_weights=False)[0]


@pytest.fixture(params=["graph", "recompute"])
def attention_path(request, monkeypatch):
    """Run a self-attention test both ways: projections read from the call's own graph (the rule's
    first choice; asserted taken) and recomputed (its fallback, forced by finding no graph nodes)."""
    from diffin_lightning.dots import rules

    calls = {"graph": 0, "recompute": 0}
    projection_factors, core = rules.MultiheadAttentionRule._projection_factors, rules.MultiheadAttentionRule._self_attention_core

    def spy_projection_factors(*args):
        calls["graph"] += 1
        return projection_factors(*args)

    def spy_core(*args):
        calls["recompute"] += 1
        return core(*args)

    monkeypatch.setattr(rules.MultiheadAttentionRule, "_projection_factors", staticmethod(spy_projection_factors))
    monkeypatch.setattr(rules.MultiheadAttentionRule, "_self_attention_core", staticmethod(spy_core))
    if request.param == "recompute":
        monkeypatch.setattr(rules.MultiheadAttentionRule, "inner_gradients", lambda self, module, activations, output: ())
    yield request.param
    if request.param == "graph":
        assert calls["graph"] > 0 and calls["recompute"] == 0, calls
    else:
        assert calls["recompute"] > 0, calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_self_attention(bias, batch_first, attention_path):
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first)
    if batch_first:
        _run(layer, torch.randn(5, 3, 8, dtype=torch.float64), _self_attention)
    else:
        # Sequence-first attention inside a batch-first model: the rule transposes. (One tensor as
        # query, key and value: three transposes would be three objects, which the module treats
        # as cross-attention with three projections.)
        def sequence_first(m, x):
            rows = x.transpose(0, 1)
            return m(rows, rows, rows)[0].transpose(0, 1)

        _run(layer, torch.randn(5, 3, 8, dtype=torch.float64), sequence_first)


def test_multihead_self_attention_from_the_graph_with_masks_weights_and_micro_batches(attention_path):
    """Key padding mask, an additive mask and the attention weights reaching the loss, in two
    micro-batches: off the recomputation's single-SDPA case, and exact from the call's graph."""
    torch.manual_seed(6)
    layer = nn.MultiheadAttention(8, 2, batch_first=True)
    additive = torch.randn(4, 4, dtype=torch.float64)

    def call(module, x):
        # Each sample's padding from its own values, so that any batching gives it the same mask.
        padded = x[..., 0] > 0.3
        padded[:, 0] = False  # never every key
        out, weights = module(x, x, x, key_padding_mask=padded.to(x.dtype) * -30.0, attn_mask=additive, need_weights=True)
        return torch.cat([out.flatten(1), weights.flatten(1)], dim=1)

    inputs = torch.randn(6, 4, 8, dtype=torch.float64)
    _run(layer, inputs, call, micro_batches=2)


def test_multihead_self_attention_graph_path_survives_a_products_only_pass():
    """A products-only backward (no parameter gradient) still runs the in-projection's node when a
    covered layer lies below the attention; where none does, the rule recomputes (same numbers)."""
    torch.manual_seed(7)
    for below in (True, False):
        model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)).double()
        attention = model[1]
        x = torch.randn(4, 3, 8, dtype=torch.float64)
        names = [n for n, _ in model.named_parameters() if below or not n.startswith("0.")]
        with LayerCapture(model, names) as capture:
            capture.keep_outputs = True
            with capture.recording():
                hidden = model[0](x) if below else model[0](x).detach()
                out = attention(hidden, hidden, hidden, need_weights=False)[0]
                torch.autograd.grad(out.pow(2).sum(), capture.take_outputs())
            call = capture._passes[0].calls[-1]
            assert (call.backprops[2] is not None) == below
            products_only = capture.per_sample().gradient_dots()
        with LayerCapture(model, names) as capture:
            with capture.recording():
                hidden = model[0](x) if below else model[0](x).detach()
                attention(hidden, hidden, hidden, need_weights=False)[0].pow(2).sum().backward()
            torch.testing.assert_close(capture.per_sample().gradient_dots(), products_only, rtol=1e-10, atol=0)
        model.zero_grad()


def test_multihead_cross_attention_with_masks_and_weights():
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(8, 2, batch_first=True, kdim=5, vdim=3)
    memory = torch.randn(5, 4, 5, dtype=torch.float64)
    values = torch.randn(5, 4, 3, dtype=torch.float64)
    causal = torch.triu(torch.ones(3, 4, dtype=torch.bool), diagonal=2)

    def call(module, x):
        index = torch.arange(x.shape[0]) if x.shape[0] == 5 else _current[0]
        out, weights = module(x, memory[index], values[index], attn_mask=causal, need_weights=True)
        return torch.cat([out.flatten(1), weights.flatten(1)], dim=1)  # the weights reach the loss too

    _current = [None]
    inputs = torch.randn(5, 3, 8, dtype=torch.float64)
    # The loop reference calls with one sample: tell `call` which one through the closure.
    layer = layer.double()
    out = call(layer, inputs)
    probe = Probe(layer, tuple(out.shape[1:]), call)
    names = [name for name, _ in probe.named_parameters()]
    capture, per_sample = captured(probe, probe.losses, [inputs], names)
    assert capture.covered_parameter_names == tuple(names)
    rows = {name: [] for name in names}
    for index in range(5):
        _current[0] = torch.tensor([index])
        gradients = torch.autograd.grad(probe.losses(inputs[index : index + 1]).sum(), [dict(probe.named_parameters())[n] for n in names])
        for name, gradient in zip(names, gradients):
            rows[name].append(gradient)
    check_against_reference(per_sample, {name: torch.stack(values) for name, values in rows.items()})


def test_multihead_packed_cross_attention_with_key_padding_mask():
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(8, 4, batch_first=True)
    memory = torch.randn(5, 4, 8, dtype=torch.float64)
    padding = torch.zeros(5, 4, dtype=torch.bool)
    padding[:, -1] = True
    _run(layer, torch.cat([torch.randn(5, 3, 8, dtype=torch.float64), memory], dim=1),
         lambda m, x: m(x[:, :3], x[:, 3:], x[:, 3:], key_padding_mask=padding[: x.shape[0]])[0])


def test_huggingface_conv1d():
    transformers = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    layer = transformers.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs
    with torch.no_grad():
        layer.bias.normal_()
    assert rule_for(layer) is not None
    assert any(name.endswith("Conv1D") for name in supported_layer_types())
    _run(layer, torch.randn(5, 3, 4, dtype=torch.float64))


def test_cost_model_picks_gram_for_wide_linear_and_materialised_for_conv():
    torch.manual_seed(0)
    wide = nn.Linear(256, 256).double()
    with LayerCapture(wide) as capture:
        with capture.recording():
            wide(torch.randn(8, 256, dtype=torch.float64)).pow(2).sum().backward()
        per_sample = capture.per_sample()
        # B (in + out) = 4096 per pair against in * out = 65536 per sample: Gram form.
        assert [form for _, form, _ in per_sample.plan("gradient_dots")] == ["gram"]
        assert [form for _, form, _ in per_sample.plan("squared_norms")] == ["gram"]
        assert [form for _, form, _ in per_sample.plan("dots", directions=3)] == ["direct"]
    conv = nn.Conv2d(8, 16, 3, padding=1).double()
    with LayerCapture(conv) as capture:
        with capture.recording():
            conv(torch.randn(8, 8, 16, 16, dtype=torch.float64)).pow(2).sum().backward()
        per_sample = capture.per_sample()
        # 256 positions: the Gram diagonal's P^2 (m + k) loses to materialising m k per sample ...
        assert [form for _, form, _ in per_sample.plan("squared_norms")] == ["materialised"]
        assert [form for _, form, _ in per_sample.plan("dots", directions=3)] == ["materialised"]
        assert [form for _, form, _ in per_sample.plan("gradient_dots")] == ["direct"]
        per_sample.squared_norms()
        # ... and once materialised, every other product reuses it.
        assert [form for _, form, _ in per_sample.plan("gradient_dots")] == ["materialised"]
        assert [form for _, form, _ in per_sample.plan("dots", directions=1)] == ["materialised"]



def test_a_single_use_view_charges_materialising_its_writes():
    """Sequence Linear, 32 positions, two directions: a view that keeps its materialised gradients for later
    quantities materialises (B P m k + 2 B m k < 2 B P m k); a products-only view (the end-of-fit pass), which
    would write them for this one product and drop them, takes the direct form; so does a dots-only stream."""
    from diffin_lightning.dots.stream import ProductStream

    torch.manual_seed(0)
    layer = nn.Linear(8, 16).double()
    with LayerCapture(layer) as capture:
        with capture.recording():
            layer(torch.randn(4, 32, 8, dtype=torch.float64)).pow(2).sum().backward()
        per_sample = capture.per_sample()
        assert [form for _, form, _ in per_sample.plan("dots", directions=2)] == ["materialised"]
        per_sample.keep_materialised = False
        assert [form for _, form, _ in per_sample.plan("dots", directions=2)] == ["direct"]
        directions = [{name: torch.randn_like(p) for name, p in layer.named_parameters()} for _ in range(2)]
        per_sample.keep_materialised = True
        kept = per_sample.dots(directions)
        per_sample.keep_materialised = False
        assert torch.allclose(per_sample.dots(directions), kept, rtol=1e-12)
    block = per_sample.passes[0][0]
    names = [name for name, _ in layer.named_parameters()]
    assert ProductStream(directions=tuple(directions))._single(block, names).keep_materialised is False
    assert ProductStream(directions=tuple(directions), squared_norms=True)._single(block, names).keep_materialised is True

def test_unsupported_layers_are_named_with_the_registry_list():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.Embedding(4, 3, max_norm=1.0))
    capture = LayerCapture(model)
    assert capture.covered_parameter_names == ("0.weight", "0.bias")
    assert capture.uncovered_parameter_names == ("1.scale", "2.weight")
    assert capture.uncovered_reasons["1.scale"] == "1 (Scale) has no rule; scale goes through the fallback"
    assert capture.uncovered_reasons["2.weight"].startswith("2 (Embedding): ") and "max_norm" in capture.uncovered_reasons["2.weight"]
    with pytest.raises(ValueError, match="`parameter_names` must name parameters"):
        LayerCapture(model, ["nope"])
    capture.remove()
    # The callback's message: every reason, then the registry's list once (not once per reason).
    step_capture = StepCapture(model, [name for name, _ in model.named_parameters()])
    message = step_capture.fallback_message()
    step_capture.remove()
    assert "1 (Scale) has no rule" in message and "2 (Embedding): " in message
    tail = message.split("Supported layers: ")
    assert len(tail) == 2 and "supported" not in tail[0].lower()
    for layer_type in supported_layer_types():
        assert layer_type.rsplit(".", 1)[-1] in tail[1]


def test_a_parameter_a_covered_layers_rule_leaves_out_is_reported_as_such():
    """Attention with add_bias_kv: MultiheadAttention has a rule, which covers the projections and not bias_k / bias_v."""
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True))
    capture = LayerCapture(model)
    assert capture.uncovered_parameter_names == ("1.bias_k", "1.bias_v")
    expected = (
        "1 (MultiheadAttention): MultiheadAttention's rule covers its projections "
        "(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias); bias_k and bias_v go through the fallback"
    )
    assert capture.uncovered_reasons == {"1.bias_k": expected, "1.bias_v": expected}
    capture.remove()


@pytest.mark.parametrize("in_features, out_features", [(3, 5), (5, 3)])
def test_linear_direct_dots_on_either_side_and_in_chunks(in_features, out_features, monkeypatch):
    """The direct form projects the narrower side; with a tiny chunk bound the directions go through in several chunks."""
    from diffin_lightning.dots import factors

    monkeypatch.setattr(factors, "_CHUNK_ELEMENTS", 7)  # one direction per chunk
    torch.manual_seed(3)
    _run(nn.Linear(in_features, out_features), torch.randn(6, 2, in_features, dtype=torch.float64))


def _causal_self_attention(layer, x):
    length = x.shape[0] if not layer.batch_first else x.shape[1]
    mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
    return layer(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_self_attention_one_sdpa_path_causal_and_sequence_first(batch_first, monkeypatch):
    """The recomputation's single-SDPA path (packed self-attention, the graph not read): causal mask via is_causal, and sequence-first inputs."""
    from diffin_lightning.dots import rules

    monkeypatch.setattr(rules.MultiheadAttentionRule, "inner_gradients", lambda self, module, activations, output: ())
    taken = []
    original = rules.MultiheadAttentionRule._self_attention_core

    def spy(*args):
        result = original(*args)
        taken.append(result is not None)
        return result

    torch.manual_seed(4)
    layer = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    call = _causal_self_attention if batch_first else (lambda m, x: _causal_self_attention(m, x.transpose(0, 1)).transpose(0, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rules.MultiheadAttentionRule, "_self_attention_core", staticmethod(spy))
        _run(layer, torch.randn(5, 4, 8, dtype=torch.float64), call)
    assert taken and all(taken)


def test_convolution_called_twice_in_one_forward():
    """Weight sharing: the two calls' lazily unfolded factors merge into one block."""
    torch.manual_seed(5)
    _run(nn.Conv2d(3, 3, kernel_size=3, padding=1, groups=3), torch.randn(4, 3, 5, 5, dtype=torch.float64), lambda layer, x: layer(torch.tanh(layer(x))))


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Linear(4, 3), (5, 2, 4)), (nn.Conv2d(3, 4, 3, padding=1, groups=1), (4, 3, 5, 5)), (nn.Embedding(7, 3), None)],
)
def test_wide_layers_take_several_directions_one_at_a_time(layer, shape, monkeypatch):
    """Above the size bound (here every layer) the direct form takes each direction as a view, one at a time."""
    from diffin_lightning.dots import per_sample_dots

    monkeypatch.setattr(per_sample_dots, "_LARGE_DIRECTION_ELEMENTS", 1)
    seen = []
    original = per_sample_dots._StackedDirections.__init__

    def spy(self, directions, names):
        seen.append(len(directions))
        original(self, directions, names)

    monkeypatch.setattr(per_sample_dots._StackedDirections, "__init__", spy)
    torch.manual_seed(8)
    _run(layer, torch.randint(0, 7, (5, 4)) if shape is None else torch.randn(shape, dtype=torch.float64))
    assert 1 in seen and 3 in seen  # one-direction views for the direct form; the stack for the materialised one


@pytest.mark.parametrize("layer", [nn.LayerNorm(6), nn.RMSNorm(6), nn.GroupNorm(3, 6)], ids=["layer", "rms", "group"])
def test_normalisation_layers_called_twice_over_uneven_micro_batches(layer):
    """The eager rules' factors, formed in the backward from each call's unscaled gradient, are summed over
    the calls (a shared layer) and rescaled per micro-batch (5 = 3 + 2 samples: two different scales)."""
    torch.manual_seed(11)
    with torch.no_grad():
        layer.weight.normal_()
    _run(layer, torch.randn(5, 6, dtype=torch.float64), lambda m, x: m(torch.tanh(m(x))), micro_batches=2)
