"""The fallback for parameters outside the registry: ``<v, G_i>`` from the per-sample loss vector.

``loss_vector_fn(params) -> Tensor[B]`` evaluates the per-sample losses with ``params``
swapped in (``torch.func.functional_call``). For parameters ``U`` that no layer rule
covers, ``<v, G_i>`` restricted to ``U`` is the directional derivative of ``l_i`` along
``v`` (zero outside ``U``), for every i at once:

- ``"jvp"``: ``torch.func.jvp``, exact, about one forward; fails on kernels without
  forward-mode AD (``scaled_dot_product_attention``'s flash / efficient kernels);
- ``"finite_difference"``: ``(l(theta + h v) - l(theta - h v)) / (2 h)``, two forwards
  without autograd, any kernel. The step is ``h = c * max(|theta_U|, 1) / |v_U|`` with
  ``c = eps_dtype ** (1/3)`` (6.1e-6 in float64, 4.9e-3 in float32), which balances the
  O(h^2) truncation against rounding. Error bound, as a fraction of ``max_i |<v, G_i>|``
  (asserted in tests/test_dots_functional.py on a tanh MLP and a causal SDPA attention
  model): below 1e-8 in float64 (measured 5e-11 and 9e-11), below 5e-4 in float32
  (measured 3e-5 and 5e-5, against float64 exact products);
- ``"auto"``: jvp, and on the first NotImplementedError / RuntimeError from forward-mode AD
  the finite difference, with one info message naming the modules.

The loss vector must be deterministic (seed dropout identically at every evaluation): a
finite difference of two different random functions is noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from diffin_lightning.precision import widened

Params = dict[str, Tensor]
FallbackMethod = Literal["auto", "jvp", "finite_difference"]
FALLBACK_METHODS: tuple[FallbackMethod, ...] = ("auto", "jvp", "finite_difference")

log = logging.getLogger("diffin_lightning.dots")
_ANNOUNCED: set[tuple[str, ...]] = set()


def _owners(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({name.rpartition(".")[0] or "<root>" for name in names}))


def finite_difference_step(dtype: torch.dtype) -> float:
    """``c = eps_dtype ** (1/3)``, the relative step that balances truncation and rounding."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def _norm(tensors: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.sqrt(sum(widened(tensors[name]).pow(2).sum() for name in names))  # type: ignore[arg-type]


def functional_dots(
    loss_vector_fn: Callable[[Params], Tensor],
    params: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    only: Sequence[str] | None = None,
    method: FallbackMethod = "auto",
    relative_step: float | None = None,
) -> Tensor:
    """``[<v_d, G_i>]`` restricted to the parameters ``only``, as ``Tensor[D, B]``.

    Args:
        loss_vector_fn: ``params -> Tensor[B]``, the per-sample losses at ``params``.
        params: every trainable parameter (name -> value); those outside ``only`` stay fixed.
        directions: D dictionaries holding at least the ``only`` entries.
        only: the parameters to differentiate (the capture's uncovered ones); default all of ``params``.
        method: ``"auto"``, ``"jvp"`` or ``"finite_difference"`` (see the module docstring).
        relative_step: overrides the finite difference's ``c``.

    Example::

        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> losses = lambda p: (x @ p["w"]) ** 2 / 2        # l_i = (x_i . w)^2 / 2, G_i = (x_i . w) x_i
        >>> functional_dots(losses, {"w": w}, [{"w": torch.ones(2, dtype=torch.float64)}], method="jvp")
        tensor([[ 1., 18.]], dtype=torch.float64)
    """
    if method not in FALLBACK_METHODS:
        raise ValueError(f"`method` must be one of {FALLBACK_METHODS}; got {method!r}.")
    names = list(params) if only is None else list(only)
    unknown = [name for name in names if name not in params]
    if unknown:
        raise ValueError(f"`only` must name entries of `params`; got unknown {unknown[:5]}. Fix: pass the capture's `uncovered_parameter_names`.")
    params = dict(params)
    if not names or not directions:
        raise ValueError(
            f"functional_dots needs at least one parameter and one direction; got {len(names)} parameters and {len(directions)} directions. "
            "Fix: skip the call when the capture covers every parameter."
        )
    if method in ("auto", "jvp"):
        try:
            return torch.stack([_jvp_dots(loss_vector_fn, params, direction, names) for direction in directions])
        except (NotImplementedError, RuntimeError) as error:
            if method == "jvp":
                raise
            modules = _owners(names)
            if modules not in _ANNOUNCED:
                _ANNOUNCED.add(modules)
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.info(
                    "diffin_lightning.dots: forward-mode AD failed (%s); per-sample dot products for the parameters of %s "
                    "use central finite differences of the per-sample losses instead.",
                    first_line,
                    ", ".join(modules),
                )
    return torch.stack([_finite_difference_dots(loss_vector_fn, params, direction, names, relative_step) for direction in directions])


def _jvp_dots(loss_vector_fn: Callable[[Params], Tensor], params: Params, direction: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    primals = {name: params[name] for name in names}
    tangents = {name: direction[name].to(params[name].dtype) for name in names}

    def restricted(part: Params) -> Tensor:
        return loss_vector_fn({**params, **part})

    return jvp(restricted, (primals,), (tangents,))[1]


def _finite_difference_dots(
    loss_vector_fn: Callable[[Params], Tensor], params: Params, direction: Mapping[str, Tensor], names: Sequence[str], relative_step: float | None
) -> Tensor:
    dtype = params[names[0]].dtype
    direction_norm = _norm(direction, names)
    if float(direction_norm) == 0.0:
        with torch.no_grad():
            return torch.zeros_like(loss_vector_fn(params))
    scale = finite_difference_step(dtype) if relative_step is None else relative_step
    step = scale * torch.clamp(_norm(params, names), min=1.0) / direction_norm
    with torch.no_grad():
        plus = loss_vector_fn({**params, **{name: params[name] + (step * direction[name]).to(dtype) for name in names}})
        minus = loss_vector_fn({**params, **{name: params[name] - (step * direction[name]).to(dtype) for name in names}})
    return ((widened(plus) - widened(minus)) / (2 * step)).to(plus.dtype)


def functional_squared_norms(
    sample_loss_fn: Callable[[Params, Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    only: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``[|G_i|^2]`` restricted to ``only``, by ``vmap`` over per-sample gradients (a loop where vmap fails).

    Args:
        sample_loss_fn: ``(params, batch) -> Tensor[B]``, per-sample losses of a batch.
        params: every trainable parameter.
        batch: a pytree whose tensors carry the samples on dim 0.
        only: the parameters to differentiate; default all.
        chunk_size: samples per vmap chunk (memory).
    """
    from torch.utils._pytree import tree_map

    params = dict(params)
    names = list(params) if only is None else list(only)
    fixed = {name: value for name, value in params.items() if name not in names}

    def one_sample_loss(part: Params, sample: Any) -> Tensor:
        return sample_loss_fn({**fixed, **part}, tree_map(lambda leaf: leaf.unsqueeze(0) if isinstance(leaf, Tensor) else leaf, sample)).squeeze(0)

    def one_sample_norm(part: Params, sample: Any) -> Tensor:
        gradients = grad(one_sample_loss)(part, sample)
        return sum(value.pow(2).sum() for value in gradients.values())  # type: ignore[return-value]

    variables = {name: params[name] for name in names}
    in_dims = (None, tree_map(lambda leaf: 0 if isinstance(leaf, Tensor) and leaf.dim() > 0 else None, batch))
    try:
        return vmap(one_sample_norm, in_dims=in_dims, chunk_size=chunk_size, randomness="same")(variables, batch)
    except (NotImplementedError, RuntimeError):
        size = next(leaf.shape[0] for leaf in _leaves(batch) if isinstance(leaf, Tensor) and leaf.dim() > 0)
        out = []
        for index in range(size):
            sample = tree_map(lambda leaf: leaf[index] if isinstance(leaf, Tensor) and leaf.dim() > 0 else leaf, batch)
            with torch.enable_grad():
                leaves = {name: value.detach().requires_grad_(True) for name, value in variables.items()}
                loss = one_sample_loss(leaves, sample)
                gradients = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            out.append(sum(g.pow(2).sum() for g in gradients if g is not None))
        return torch.stack(out)


def _leaves(tree: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(tree)
