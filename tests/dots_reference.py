"""Brute-force float64 references for the dots tests: per-sample gradients by a Python loop over samples."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffin_lightning.dots import LayerCapture, PerSampleDots

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}


def rows_of(full: Tensor, part: Tensor) -> slice:
    """The rows of ``full`` that ``part`` (a slice of it) holds: per-sample targets follow their inputs."""
    start = (part.data_ptr() - full.data_ptr()) // (full.stride(0) * full.element_size())
    return slice(start, start + part.shape[0])


def per_sample_gradients_by_loop(model: nn.Module, losses: Callable[[Tensor], Tensor], inputs: Tensor, names: list[str]) -> dict[str, Tensor]:
    """``{name: Tensor[B, *shape]}``: each sample's loss alone, through autograd (the reference)."""
    parameters = dict(model.named_parameters())
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    for index in range(inputs.shape[0]):
        loss = losses(inputs[index : index + 1]).sum()
        gradients = torch.autograd.grad(loss, [parameters[name] for name in names], allow_unused=True)
        for name, gradient in zip(names, gradients):
            rows[name].append(torch.zeros_like(parameters[name]) if gradient is None else gradient)
    return {name: torch.stack(values) for name, values in rows.items()}


def captured(model: nn.Module, losses: Callable[[Tensor], Tensor], micro_batches: list[Tensor], names: list[str] | None = None) -> tuple[LayerCapture, PerSampleDots]:
    """Record one optimizer step of mean losses accumulated over ``micro_batches`` (each divided by their count)."""
    capture = LayerCapture(model, names)
    model.zero_grad()
    with capture.recording():
        for inputs in micro_batches:
            (losses(inputs).mean() / len(micro_batches)).backward()
    # Every micro-batch's mean was divided by k: the sum of its per-sample losses is k * B_m times that.
    scales = [len(micro_batches) * inputs.shape[0] for inputs in micro_batches]
    return capture, capture.per_sample(backprop_scale=scales)


def check_against_reference(per_sample: PerSampleDots, reference: dict[str, Tensor], directions: int = 3, seed: int = 0) -> None:
    """Every quantity of ``per_sample`` in every form equals the loop reference to 1e-10."""
    generator = torch.Generator().manual_seed(seed)
    names = list(reference)
    flat = torch.cat([reference[name].flatten(1) for name in names], dim=1)  # [B, P]
    materialised = per_sample.per_sample_gradients()
    for name in names:
        expected = reference[name]
        got = materialised.get(name, torch.zeros_like(expected))
        torch.testing.assert_close(got, expected, **TOLERANCE, msg=lambda m, name=name: f"per-sample gradient of {name}: {m}")
    vectors = [{name: torch.randn(reference[name].shape[1:], generator=generator, dtype=torch.float64) for name in names} for _ in range(directions)]
    expected_dots = torch.stack([flat @ torch.cat([v[name].flatten() for name in names]) for v in vectors])
    for form in (None, "direct", "materialised"):
        torch.testing.assert_close(per_sample.dots(vectors, form=form), expected_dots, **TOLERANCE, msg=lambda m, form=form: f"dots ({form}): {m}")
    expected_gradient_dots = flat @ flat.sum(0)
    for form in (None, "direct", "gram", "materialised"):
        torch.testing.assert_close(per_sample.gradient_dots(form=form), expected_gradient_dots, **TOLERANCE, msg=lambda m, form=form: f"gradient_dots ({form}): {m}")
    expected_norms = flat.pow(2).sum(1)
    for form in (None, "gram", "materialised"):
        torch.testing.assert_close(per_sample.squared_norms(form=form), expected_norms, **TOLERANCE, msg=lambda m, form=form: f"squared_norms ({form}): {m}")
    torch.testing.assert_close(per_sample.gram(), flat @ flat.T, **TOLERANCE)
    summed = per_sample.summed_gradient()
    for name in names:
        torch.testing.assert_close(summed.get(name, torch.zeros_like(reference[name][0])), reference[name].sum(0), **TOLERANCE)
