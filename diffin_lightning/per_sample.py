"""Per-sample quantities of a model's loss, batched with ``torch.func``.

Everything the estimator needs from the model reduces to four primitives on the
vector of per-sample losses ``l(theta) = [l_1(theta), ..., l_B(theta)]``:

- the batch gradient ``G_B = grad (1/|B|) sum_i l_i``  (reverse mode, one backward);
- the per-sample dot products ``<v, G_i>`` for every ``i`` at once: the forward-mode
  derivative of ``l`` along ``v`` (one ``jvp``, about the cost of one forward);
- the per-sample squared gradient norms ``|G_i|^2`` (``vmap`` over per-sample
  gradients, in chunks to bound memory);
- the loss values themselves.

Parameters are passed explicitly (``functional_call``), so evaluating at a
perturbed point never touches the module's own parameters: nothing has to be
restored afterwards, and no rounding from "add then subtract" creeps in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_map


Params = dict[str, Tensor]
LossFn = Callable[[nn.Module, Any], Tensor]
# The CPU generator's state and, on a CUDA device, that device's generator state.
RngState = tuple[Tensor, Tensor | None]


def rng_state(device: torch.device) -> RngState:
    """The state of the generators a forward pass on ``device`` draws from (dropout masks)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _LossModule(nn.Module):
    """Makes ``loss_fn(module, batch)`` a module's forward so ``functional_call`` can swap its parameters."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.module, batch)


def _prefixed(params: Params) -> Params:
    return {f"module.{name}": value for name, value in params.items()}


def add_scaled(params: Params, direction: Params, scale: float) -> Params:
    """``params + scale * direction``, as new tensors."""
    return {name: value + scale * direction[name] for name, value in params.items()}


def dot(a: Params, b: Params) -> Tensor:
    """The inner product of two parameter-shaped dictionaries over ``a``'s names, as a 0-d tensor (no parameter-sized temporary)."""
    return torch.stack([torch.dot(a[name].reshape(-1), b[name].reshape(-1)) for name in a]).sum()


def norm(params: Params) -> Tensor:
    return torch.sqrt(dot(params, params))


class PerSampleLoss:
    """The vector of per-sample losses of ``module`` as a function of its trainable parameters.

    Args:
        module: the model; its trainable parameters are the variables, its frozen
            parameters and buffers are constants.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``, one unreduced loss per sample.
        seed: the random seed every evaluation starts from, so that dropout draws the
            same masks at ``theta`` and at the perturbed point (a finite difference of
            two different random functions would be noise). ``None`` leaves the RNG alone.
            Batches given to :meth:`replay_rng_states` start from their own recorded state instead.

    The callback's fast path reads per-sample products from captured layer factors
    (:mod:`diffin_lightning.dots`); this class is the ``torch.func`` path
    (``dot_products="functional"``, the checkpoint schedule) and evaluates losses for both.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> fn = lambda m, b: (m(b["x"]).squeeze(-1) - b["y"]) ** 2
        >>> loss = PerSampleLoss(model, fn)
        >>> batch = {"x": torch.randn(4, 2), "y": torch.randn(4)}
        >>> loss.values(loss.parameters(), batch).shape
        torch.Size([4])
    """

    def __init__(self, module: nn.Module, loss_fn: LossFn, seed: int | None = None) -> None:
        self._wrapper = _LossModule(module, loss_fn)
        self.module = module
        self.seed = seed
        # id(batch) -> (batch, the RNG state its training forward started from)
        self._rng_states: dict[int, tuple[Any, RngState]] = {}

    def clear_captures(self) -> None:
        """Forget the replayed RNG states."""
        self._rng_states.clear()

    def replay_rng_states(self, batches_and_states: Iterable[tuple[Any, RngState]]) -> None:
        """Evaluate each of these batches from its given RNG state (the training step's dropout masks).

        Held until :meth:`clear_captures`; other batches keep starting from ``seed``.
        """
        for batch, state in batches_and_states:
            self._rng_states[id(batch)] = (batch, state)

    def parameters(self) -> Params:
        """The trainable parameters, detached (the point the step starts from)."""
        return {name: p.detach() for name, p in self.module.named_parameters() if p.requires_grad}

    def _call(self, params: Params, batch: Any) -> Tensor:
        # Buffers are passed as copies so that batch-norm running statistics are not
        # updated by the callback's extra passes: training must not see them.
        buffers = {f"module.{name}": b.clone() for name, b in self.module.named_buffers()}
        device = next(iter(params.values())).device
        replayed = self._rng_states.get(id(batch))
        if replayed is not None and replayed[0] is batch:
            cpu_state, cuda_state = replayed[1]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, device)
                return functional_call(self._wrapper, {**buffers, **_prefixed(params)}, (batch,), strict=False)
        if self.seed is None:
            return functional_call(self._wrapper, {**buffers, **_prefixed(params)}, (batch,), strict=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # Seed only the generators in use: torch.manual_seed would also poke every lazy
            # accelerator backend, which costs milliseconds per call.
            torch.default_generator.manual_seed(self.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(self.seed)
            return functional_call(self._wrapper, {**buffers, **_prefixed(params)}, (batch,), strict=False)

    def module_values(self, batch: Any) -> Tensor:
        """``[l_i]`` of the module as it is (its own parameters; the caller restores anything the pass changes)."""
        if self.seed is None:
            return self._wrapper(batch)
        device = next(self.module.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(self.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(self.seed)
            return self._wrapper(batch)

    def values(self, params: Params, batch: Any) -> Tensor:
        """``[l_i(params)]`` for the samples of ``batch``."""
        return self._call(params, batch)

    def batch_gradient(self, params: Params, batches: Iterable[Any], total: int | None = None) -> Params:
        """``grad (1/total) sum_{i in batches} l_i`` at ``params``.

        ``batches`` are the step's micro-batches (or a target's batches); ``total``
        defaults to the number of samples they hold, which makes this the mean loss's gradient.
        """
        result: Params | None = None
        count = 0
        for batch in batches:
            part, size = self._gradient_of_sum(params, batch)
            count += size
            result = part if result is None else {k: result[k] + part[k] for k in result}
        if result is None or count == 0:
            raise ValueError("batch_gradient: `batches` yielded no samples; a gradient needs at least one.")
        return {k: v / (count if total is None else total) for k, v in result.items()}

    def _gradient_of_sum(self, params: Params, batch: Any) -> tuple[Params, int]:
        """``(grad sum_{i in batch} l_i, |batch|)``."""
        def sum_and_values(p: Params) -> tuple[Tensor, Tensor]:
            losses = self._call(p, batch)
            return losses.sum(), losses.detach()

        summed, losses = grad(sum_and_values, has_aux=True)(params)
        return summed, int(losses.shape[0])

    def dots(self, params: Params, batches: Sequence[Any], direction: Params) -> Tensor:
        """``[<direction, grad l_i(params)>]`` for every sample of every micro-batch, concatenated."""
        out = []
        for batch in batches:
            _, tangent = jvp(lambda p: self._call(p, batch), (params,), (direction,))
            out.append(tangent)
        return torch.cat(out)

    def squared_gradient_norms(self, params: Params, batches: Sequence[Any], chunk_size: int | None) -> Tensor:
        """``[|grad l_i(params)|^2]`` for every sample, through ``vmap`` in chunks of ``chunk_size``."""

        def one_sample_loss(p: Params, sample: Any) -> Tensor:
            return self._call(p, tree_map(_add_batch_dim, sample)).squeeze(0)

        def one_sample_squared_norm(p: Params, sample: Any) -> Tensor:
            g = grad(one_sample_loss)(p, sample)
            return sum(torch.sum(v * v) for v in g.values())

        out = []
        for batch in batches:
            in_dims = (None, tree_map(_batch_dim_of, batch))
            out.append(vmap(one_sample_squared_norm, in_dims=in_dims, chunk_size=chunk_size, randomness="different")(params, batch))
        return torch.cat(out)


def _batch_dim_of(leaf: Any) -> int | None:
    return 0 if isinstance(leaf, Tensor) and leaf.dim() > 0 else None


def _add_batch_dim(leaf: Any) -> Any:
    return leaf.unsqueeze(0) if isinstance(leaf, Tensor) else leaf
