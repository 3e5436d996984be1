"""Where the per-sample quantities of a step come from: the training step itself, or a recomputation.

The estimator (``diffin_lightning.step``) needs, for the samples ``i`` of an optimizer step
at the parameters ``theta`` it starts from:

- the batch gradient ``G_B``;
- ``<v, G_i>`` for a few directions ``v`` (the target gradients);
- ``<G_B, G_i>`` (``f_i``, whose finite difference is the Diff-In bracket) and ``|G_i|^2``;
- the same ``G_B`` and ``f_i`` at a perturbed point ``theta + eps u``.

:class:`CapturedStep` reads the first three from Lightning's own training step: module
hooks record each supported layer's inputs and output gradients during the real forward
and backward (only on recorded steps), and ``G_B`` is the parameters' ``.grad`` as
``on_before_optimizer_step`` sees it (all micro-batches, unscaled by AMP). The only extra
forward+backward is the one at the perturbed point; it restores the random state each
micro-batch's training step started from, so dropout draws the training step's masks,
and it runs on copies of the buffers, so batch-norm statistics never see it.

:class:`RecomputedStep` recomputes everything with :class:`~diffin_lightning.per_sample.PerSampleLoss`
(``torch.func``, seeded RNG): the path for models whose layers the capture does not cover,
for ``dot_products="functional"``, and for training steps whose loss is not the mean of
``per_sample_loss`` (checked once, numerically, on the first recorded step).

Both hand the estimator the same :class:`StepGradients` interface. Under DDP each rank's
view holds its own shard's samples, while the batch gradients at ``theta`` and at the
perturbed point are the global batch's (``.grad`` already is; the recomputed and perturbed
ones are averaged over ranks, as DDP averages ``.grad``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from diffin_lightning import distributed, ghost
from diffin_lightning.per_sample import Params, PerSampleLoss

RngState = tuple[Tensor, Tensor | None]


class StepGradients(Protocol):
    """What the per-step maths reads from the model (every tensor on the model's device)."""

    batch_gradient: Params

    def dots(self, directions: Sequence[Params]) -> Tensor:
        """``[<v_d, G_i>]`` of shape ``[D, B]`` at ``theta``."""
        ...

    def gradient_dots(self) -> Tensor:
        """``[<G_B, G_i>]_i`` at ``theta``."""
        ...

    def squared_norms(self) -> Tensor:
        """``[|G_i|^2]_i`` at ``theta``."""
        ...

    def perturbed(self, shift: Params) -> tuple[Params, Tensor]:
        """``(G_B, [<G_B, G_i>]_i)`` at ``theta + shift``."""
        ...


# ---------------------------------------------------------------------- random state


def save_rng_state(device: torch.device) -> RngState:
    """The generators a forward on ``device`` draws from (CPU, and the device's own on CUDA)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    """Run with the random state a training step started from, and leave the training's own RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
        yield


# ---------------------------------------------------------------------- capture


@dataclass
class _MicroBatch:
    batch: Any
    size: int
    rng: RngState | None
    capture: ghost.GhostCapture = field(default_factory=ghost.GhostCapture)


class TrainingStepCapture:
    """Hooks that record each covered layer's inputs and output gradients during the training step.

    Covered today: ``nn.Linear`` layers (weights and biases), with any number of leading
    positions. :attr:`covers_all` says whether every trainable parameter is covered, which the
    capture path needs.

    Args:
        module: the LightningModule.
        parameter_names: the trainable parameters' names.
    """

    def __init__(self, module: nn.Module, parameter_names: Sequence[str]) -> None:
        self.module = module
        self.parameter_names = list(parameter_names)
        self.covers_all = ghost.supports(module, self.parameter_names)
        self._names = {id(layer): name for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}
        self._handles: list[Any] = []
        self.micro_batches: list[_MicroBatch] = []

    @property
    def recording(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        if self._handles:
            return
        for layer in self.module.modules():
            if isinstance(layer, nn.Linear):
                self._handles.append(layer.register_forward_hook(self._remember))

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin_micro_batch(self, batch: Any, size: int, rng: RngState | None) -> None:
        self.micro_batches.append(_MicroBatch(batch, size, rng))

    def clear(self) -> None:
        self.micro_batches = []

    def _remember(self, layer: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        # Only the training step's differentiable forward counts: no-grad forwards (other
        # callbacks' metrics, validation) have no output gradients to pair with.
        if not self.micro_batches or not isinstance(output, Tensor) or not output.requires_grad:
            return
        name = self._names[id(layer)]
        prefix = f"{name}." if name else ""
        weight = f"{prefix}weight"
        if not layer.weight.requires_grad:
            return
        bias = f"{prefix}bias" if getattr(layer, "bias", None) is not None and layer.bias.requires_grad else None
        # Under autocast the activations are half precision; the products are taken in the parameters' dtype.
        dtype = layer.weight.dtype
        use = ghost.LayerUse(weight=weight, bias=bias, inputs=inputs[0].detach().to(dtype))
        self.micro_batches[-1].capture.uses.append(use)
        output.register_hook(lambda gradient, use=use: setattr(use, "output_gradients", gradient.detach().to(dtype)))


def _scaled(values: Tensor, scale: Tensor | float) -> Tensor:
    return values * scale


class CapturedStep:
    """A step's per-sample quantities from the training step's own captures and ``.grad``.

    Args:
        loss: the per-sample loss (the perturbed pass evaluates it).
        params: ``theta`` (the module's trainable parameters, detached).
        micro_batches: the step's captured micro-batches.
        batch_gradient: ``G_B`` (from ``.grad``).
        backprop_scale: what turns a captured output gradient into the gradient of that
            sample's own loss (``k |b|`` for a mean loss over ``k`` accumulated micro-batches of
            ``|b|`` samples, divided by AMP's loss scale).
        forward_context: the precision context the training step's forward ran in.
    """

    def __init__(
        self,
        loss: PerSampleLoss,
        params: Params,
        micro_batches: list[_MicroBatch],
        batch_gradient: Params,
        backprop_scale: Tensor | float,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.loss, self.params, self.micro_batches = loss, params, micro_batches
        self.batch_gradient = batch_gradient
        self.scale = backprop_scale
        self.batch_size = sum(mb.size for mb in micro_batches)
        self.forward_context = forward_context
        self._gradient_dots: Tensor | None = None

    def dots(self, directions: Sequence[Params]) -> Tensor:
        rows = [torch.cat([mb.capture.dots(direction) for mb in self.micro_batches]) for direction in directions]
        return _scaled(torch.stack(rows), self.scale)

    def gradient_dots(self) -> Tensor:
        if self._gradient_dots is None:
            self._gradient_dots = self.dots([self.batch_gradient])[0]
        return self._gradient_dots

    def squared_norms(self) -> Tensor:
        norms = torch.cat([mb.capture.squared_norms() for mb in self.micro_batches])
        return _scaled(norms, self.scale * self.scale if isinstance(self.scale, Tensor) else self.scale**2)

    def perturbed(self, shift: Params) -> tuple[Params, Tensor]:
        point = dict(zip(self.params, torch._foreach_add(list(self.params.values()), list(shift.values()))))
        summed: list[Tensor] | None = None
        captures = []
        device = next(iter(self.params.values())).device
        for mb in self.micro_batches:
            with replayed_rng(mb.rng, device), self.forward_context():
                part, _, capture = ghost.gradient_with_capture(self.loss.module, lambda p, b=mb.batch: self.loss.values(p, b), point)
            captures.append(capture)
            if summed is None:
                summed = list(part.values())
            else:
                torch._foreach_add_(summed, list(part.values()))
        assert summed is not None
        torch._foreach_div_(summed, float(self.batch_size))
        gradient = distributed.mean_over_ranks(dict(zip(self.params, summed)))  # the global batch's, like .grad
        f_plus = torch.cat([capture.dots(gradient) for capture in captures])
        return gradient, f_plus


class RecomputedStep:
    """A step's per-sample quantities recomputed at ``theta`` with ``torch.func`` (seeded RNG).

    Args:
        loss: the per-sample loss, its ``seed`` set for this step.
        params: ``theta``.
        batches: the step's micro-batches.
        batch_size: ``|B|``.
        self_chunk_size: ``vmap`` chunk for squared norms.
    """

    def __init__(self, loss: PerSampleLoss, params: Params, batches: list[Any], batch_size: int, self_chunk_size: int | None = None) -> None:
        self.loss, self.params, self.batches, self.batch_size = loss, params, batches, batch_size
        self.self_chunk_size = self_chunk_size
        self._batch_gradient: Params | None = None
        self._gradient_dots: Tensor | None = None

    @property
    def batch_gradient(self) -> Params:  # type: ignore[override]
        if self._batch_gradient is None:
            local = self.loss.batch_gradient(self.params, self.batches, self.batch_size, keep_captures=True)
            self._batch_gradient = distributed.mean_over_ranks(local)  # the global batch's, as DDP's step uses
        return self._batch_gradient

    def dots(self, directions: Sequence[Params]) -> Tensor:
        return torch.stack([self.loss.dots(self.params, self.batches, direction) for direction in directions])

    def gradient_dots(self) -> Tensor:
        if self._gradient_dots is None:
            self._gradient_dots = self.loss.dots(self.params, self.batches, self.batch_gradient)
        return self._gradient_dots

    def squared_norms(self) -> Tensor:
        return self.loss.squared_gradient_norms(self.params, self.batches, self.self_chunk_size)

    def perturbed(self, shift: Params) -> tuple[Params, Tensor]:
        point = {name: value + shift[name] for name, value in self.params.items()}
        gradient = distributed.mean_over_ranks(self.loss.batch_gradient(point, self.batches, self.batch_size, keep_captures=True))
        return gradient, self.loss.dots(point, self.batches, gradient)


# ---------------------------------------------------------------------- checks


def relative_difference(a: Params, b: Params) -> float:
    """``|a - b| / max(|b|, tiny)`` over all parameters (one host sync; used once per run)."""
    difference = torch.stack([torch.linalg.vector_norm((a[k] - b[k]).double()) for k in b]).norm()
    scale = torch.stack([torch.linalg.vector_norm(b[k].double()) for k in b]).norm()
    return float(difference / scale.clamp_min(1e-300))


# ---------------------------------------------------------------------- batched passes


def gradient_of_mean(loss: PerSampleLoss, params: Params, batches: Iterable[Any], across_ranks: bool = False) -> Params:
    """``grad (1/n) sum_i l_i`` over every sample of ``batches``: one plain forward+backward per batch, summed in place.

    With ``across_ranks``, ``batches`` are this rank's shard (possibly empty) and the mean is
    over every rank's samples together: the sums and counts are added over ranks first.
    """
    names = list(params)
    leaves = [params[name].detach().requires_grad_(True) for name in names]
    point = dict(zip(names, leaves))
    total: list[Tensor] | None = None
    count = 0
    for batch in batches:
        with torch.enable_grad():
            losses = loss.values(point, batch)
            part = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        part = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, part)]
        count += int(losses.shape[0])
        if total is None:
            total = list(part)
        else:
            torch._foreach_add_(total, part)
    if across_ranks:
        summed, count = distributed.sum_with_count_over_ranks(None if total is None else dict(zip(names, total)), count, params)
        total = [summed[name] for name in names]
    if total is None or count == 0:
        raise ValueError("the target yielded no samples; a gradient needs at least one.")
    torch._foreach_div_(total, float(count))
    return dict(zip(names, total))


def training_set_batches(dataset: Any, batch_size: int, device: torch.device, collate: Callable[[list[Any]], Any] | None = None) -> Iterator[Any]:
    """The training set in id order, ``batch_size`` samples at a time, each batch moved to ``device``.

    An ``IndexedDataset`` over a ``TensorDataset`` is sliced directly (no per-sample Python
    ``__getitem__``); anything else goes through a ``DataLoader``. Under DDP, this rank's
    share (every W-th sample): a pass over the training set runs once in total, not once per rank.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from diffin_lightning.data import INDEX_KEY, IndexedDataset

    world, rank = distributed.world_size(), distributed.rank()
    inner = dataset.dataset if isinstance(dataset, IndexedDataset) else None
    if isinstance(inner, TensorDataset) and len(inner.tensors) == 2:
        inputs, targets = inner.tensors
        if world == 1:
            for start in range(0, len(inner), batch_size):
                stop = min(start + batch_size, len(inner))
                batch = {INDEX_KEY: torch.arange(start, stop), "input": inputs[start:stop], "target": targets[start:stop]}
                yield move_data_to_device(batch, device)
            return
        shard = torch.arange(rank, len(inner), world)
        for start in range(0, len(shard), batch_size):
            ids = shard[start : start + batch_size]
            yield move_data_to_device({INDEX_KEY: ids, "input": inputs[ids], "target": targets[ids]}, device)
        return
    if world > 1:
        dataset = Subset(dataset, distributed.shard_indices(range(len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **({"collate_fn": collate} if collate else {}))
    for batch in loader:
        yield move_data_to_device(batch, device)


def number_of_batches(dataset: Any, batch_size: int) -> int:
    """How many batches :func:`training_set_batches` yields on rank zero (the largest shard)."""
    return math.ceil(math.ceil(len(dataset) / distributed.world_size()) / batch_size)


def capture_outputs_only(module: nn.Module, losses_at: Callable[[Params], Tensor], params: Params) -> ghost.GhostCapture:
    """One forward and a backward that reaches every covered layer's output but computes no weight gradient.

    For passes that only need per-sample dot products (the end-of-fit pass): autograd is asked
    for the gradients of the layers' outputs, so it skips the weight-gradient products.
    """
    names = {id(layer): name for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}
    capture = ghost.GhostCapture()
    outputs: list[Tensor] = []
    handles = []

    def remember(layer: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        name = names[id(layer)]
        prefix = f"{name}." if name else ""
        if f"{prefix}weight" not in params or not output.requires_grad:
            return
        bias = f"{prefix}bias" if getattr(layer, "bias", None) is not None and f"{prefix}bias" in params else None
        capture.uses.append(ghost.LayerUse(weight=f"{prefix}weight", bias=bias, inputs=inputs[0].detach()))
        outputs.append(output)

    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            handles.append(layer.register_forward_hook(remember))
    try:
        leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
        with torch.enable_grad():
            losses = losses_at(leaves)
            gradients = torch.autograd.grad(losses.sum(), outputs)
    finally:
        for handle in handles:
            handle.remove()
    for use, gradient in zip(capture.uses, gradients):
        use.output_gradients = gradient.detach()
    return capture
