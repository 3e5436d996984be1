"""Post-hoc replay: the exact SGD-influence (Hara et al. 2019) on any target, from a trajectory log.

Optimizers: torch.optim.SGD (below) and Adam / AdamW (:func:`_adam_adjoint_step`).

:func:`trajectory_influence` reads what :class:`~diffin_lightning.trajectory.TrajectoryLog`
recorded and, segment by segment from the last to the first, replays the segment forward
from its checkpoint, checks that it arrives where the run arrived, and carries one adjoint
per target backwards through the segment's steps, adding each step's contribution to the
samples of its batch. The result has the type and file format of :func:`load_influence`,
with ``schedule="replay"``.

The adjoint, derived (DESIGN.md "Post-hoc replay" for plain SGD; here with torch.optim.SGD's
momentum, dampening, Nesterov and weight decay). A step of torch.optim.SGD with clipping factor
``c`` (Lightning's norm clipping, applied before the optimizer) reads::

    d      = c * G_B(theta) + wd * theta
    v'     = mu * v + (1 - damp) * d          (first step of the buffer: v' = d)
    theta' = theta - lr * v'                  (Nesterov: theta' = theta - lr * (d + mu * v'))

Leave-one-out removes sample i from every batch that held it: ``G_B`` loses ``w_i G_i`` (``w_i
= 1/(A |micro-batch|)``, A the gradient-accumulation factor). Linearise around the run:
``delta d = (c H_B + wd) delta theta - c w_i G_i``; the final target loss moves by ``<g_V,
delta theta_T>``. Write it as ``<a_theta, delta theta_t> + <a_v, delta v_t>`` plus the
contributions of steps ``>= t``, starting from ``a_theta = g_V(theta_T)``, ``a_v = 0``. One step
back, with ``(a_theta', a_v')`` after the step::

    <a_theta', delta theta'> + <a_v', delta v'>
      = <a_theta', delta theta> + <q, delta d> + mu_e <r, delta v>

    plain / heavy ball:  r = a_v' - lr a_theta',      q = c_e r
    Nesterov:            r = a_v' - lr mu a_theta',   q = c_e r - lr a_theta'

where ``mu_e, c_e = mu, 1 - damp`` once the buffer exists and ``0, 1`` at its first step (and
for momentum 0). Substituting ``delta d``::

    a_theta = a_theta' + c H_B q + wd q,   a_v = mu_e r,   and sample i of the step gets  -c w_i <q, G_i>.

For plain SGD (mu = 0, wd = 0, c = 1) this is ``u_t = u_{t+1} - eta H_B u_{t+1}`` and ``+(eta/|B|)
<u_{t+1}, G_i(theta_t)>``, Hara et al.'s SGD-influence. ``H_B q`` is one Hessian-vector product
per step and target: by a central finite difference of two batch gradients (default), or exactly
by forward-over-reverse (``hvp="exact"``). ``<q, G_i>`` for every i comes from the callback's per-layer
engine (:mod:`diffin_lightning.dots`: layer factors captured in one gradient pass per step, shared by
all targets, plus the functional fallback for parameters outside the registry); a model with no
covered layer takes it from the per-sample losses of the central difference's two passes,
``|q| (l_i(theta + eps q^) - l_i(theta - eps q^)) / (2 eps)``, or ``torch.func.jvp`` with ``hvp="exact"``.

Norm clipping is differentiated: on a clipped step ``c G_B = C G_B / (|G_B| + 1e-6)``, whose Jacobian
is ``c (I - kappa g g^T)`` (``g`` the unit direction of ``G_B``, ``kappa = |G_B| / (|G_B| + 1e-6)``), so
``q`` is projected, ``q - kappa <q, g> g``, before the HVP and the per-sample products
(:func:`_norm_clip_projection`; one more gradient pass on such a step where none is taken
already). Removing a sample from a clipped step turns the step, it does not shorten it.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.func import grad, jvp
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from diffin_lightning.data import INDEX_KEY, IndexedDataset, dataset_fingerprint
from diffin_lightning.dots import LayerCapture, PerSampleDots, functional_dots
from diffin_lightning.per_sample import Params, PerSampleLoss, norm
from diffin_lightning.step import CLIP_NORM_EPS
from diffin_lightning.store import InfluenceResult, TargetInfluence, save_influence
from diffin_lightning.trajectory import (
    FINAL_FILE,
    Segment,
    TrajectoryLogError,
    checkpoint_file,
    read_index,
    read_segment,
    read_tensors,
)
from diffin_lightning.version import __version__

HvpMode = Literal["central", "exact"]
HVP_MODES: tuple[HvpMode, ...] = ("central", "exact")
SUPPORTED_OPTIMIZERS = (
    "torch.optim.SGD (plain, momentum, dampening, Nesterov, weight decay)",
    "torch.optim.Adam and AdamW (without amsgrad)",
)
AUTO_STATE_BYTES = 1 << 30  # the auto max_states_in_memory: parameter sets that fit in 1 GiB
MAX_AUTO_STATES = 4096
SIGN_NOTE = "replay: the exact SGD-influence; first_order and diffin both hold it, second_order is 0"


# ---------------------------------------------------------------------- the engine, behind one class


class _StepEngine:
    """Batch gradients, Hessian-vector products and per-sample dot products of one recorded step.

    The only place the replay touches the dot-product engine, so that swapping engines is one edit.
    Every evaluation of a micro-batch restores the RNG state the run's forward of that micro-batch
    started from (when recorded), so dropout draws the run's masks.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], accumulate: int) -> None:
        self.loss = PerSampleLoss(module, loss_fn, seed=None)
        self.accumulate = accumulate
        self.module, self.loss_fn = module, loss_fn
        # The callback's per-layer engine (diffin_lightning.dots): hooks capture each covered layer's
        # inputs and output gradients during the step's gradient pass; every target's dot products then
        # come from those factors, and only parameters outside the registry use the functional fallback.
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.capture = LayerCapture(module, self.names)
        self.capture.enabled = False
        self._per_sample: PerSampleDots | None = None
        self._captured_at: Params | None = None

    @contextlib.contextmanager
    def _module_at(self, params: Params) -> Iterator[list[Tensor]]:
        """The module's own parameters set to ``params`` (the capture rules read them from the modules), restored after."""
        own = dict(self.module.named_parameters())
        leaves = [own[name] for name in self.names]
        saved = [leaf.detach().clone() for leaf in leaves]
        buffers = list(self.module.buffers())
        saved_buffers = [b.clone() for b in buffers]
        try:
            with torch.no_grad():
                for leaf, name in zip(leaves, self.names):
                    leaf.copy_(params[name])
            yield leaves
        finally:
            with torch.no_grad():
                for leaf, value in zip(leaves, saved):
                    leaf.copy_(value)
                for buffer, value in zip(buffers, saved_buffers):
                    buffer.copy_(value)

    def _captured_gradient(self, params: Params, batches: Sequence[Any], rng: Sequence[Tensor] | None) -> Params:
        """The update direction from one pass of the module itself, with the layer capture on."""
        total: list[Tensor] | None = None
        with self._module_at(params) as leaves:
            self.capture.clear()
            self.capture.enabled = True
            try:
                for k, batch in enumerate(batches):
                    with self._rng(rng[k] if rng else None), torch.enable_grad():
                        losses = self.loss_fn(self.module, batch)
                        # The sum of the per-sample losses: the rules see each sample's own gradient.
                        part = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
                    weight = float(self._weight(batch))
                    part = [torch.zeros_like(leaf) if g is None else g / weight for leaf, g in zip(leaves, part)]
                    total = part if total is None else [a + b for a, b in zip(total, part)]
            finally:
                self.capture.enabled = False
            # Before the parameters move back: the attention rule keeps a copy of its projections.
            self._per_sample = self.capture.per_sample(backprop_scale=1.0)
        self._captured_at = params
        assert total is not None
        return dict(zip(self.names, total))

    @staticmethod
    @contextlib.contextmanager
    def _rng(state: Tensor | tuple[Tensor, Tensor] | None) -> Iterator[None]:
        """Run with the recorded RNG state: a CPU state, or (CPU state, CUDA state) for a model on a GPU."""
        cpu, cuda = (state if isinstance(state, tuple) else (state, None))
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda is not None else []):
            if cpu is not None:
                torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
            yield

    def _weight(self, batch: Any) -> int:
        return self.accumulate * int(batch[INDEX_KEY].shape[0])

    def gradient(self, params: Params, batches: Sequence[Any], rng: Sequence[Tensor] | None, keep_captures: bool = False) -> Params:
        """The run's update direction before clipping: ``sum_m (1/(A|m|)) sum_{i in m} grad l_i``.

        With ``keep_captures`` the layer factors of this pass are kept for :meth:`dots` at ``params``.
        """
        if keep_captures:
            return self._captured_gradient(params, batches, rng)
        total: Params | None = None
        for k, batch in enumerate(batches):
            with self._rng(rng[k] if rng else None):
                part = self.loss.batch_gradient(params, [batch], total=self._weight(batch))
            total = part if total is None else {n: total[n] + part[n] for n in total}
        assert total is not None
        return total

    def uses_ghost(self, params: Params) -> bool:
        """Whether any trainable parameter sits in a layer the per-layer registry covers."""
        return bool(self.capture.covered_parameter_names)

    def dots(self, params: Params, batches: Sequence[Any], rng: Sequence[Tensor] | None, direction: Params) -> Tensor:
        """``[<direction, G_i(params)>]``: captured layer factors where a gradient pass at ``params`` kept them."""
        if self._per_sample is not None and self._captured_at is params:
            out = self._per_sample.dots([direction])[0]
            uncovered = list(self.capture.uncovered_parameter_names)
            if uncovered:
                parts = []
                for k, batch in enumerate(batches):

                    def losses(point: Params, batch: Any = batch, k: int = k) -> Tensor:
                        with self._rng(rng[k] if rng else None):
                            return self.loss.values(point, batch)

                    parts.append(functional_dots(losses, params, [direction], only=uncovered)[0])
                out = out + torch.cat(parts).to(out.dtype)
            return out
        out = []
        for k, batch in enumerate(batches):
            with self._rng(rng[k] if rng else None):
                out.append(self.loss.dots(params, [batch], direction))
        return torch.cat(out)

    def hvp(self, params: Params, batches: Sequence[Any], rng: Sequence[Tensor] | None, vector: Params, mode: HvpMode, eps: float) -> Params:
        """``H_B vector``, H_B the Hessian of the step's (weighted) batch loss at ``params``."""
        if mode == "exact":

            def weighted(p: Params) -> Tensor:
                total = torch.zeros((), dtype=next(iter(p.values())).dtype, device=next(iter(p.values())).device)
                for k, batch in enumerate(batches):
                    with self._rng(rng[k] if rng else None):
                        total = total + self.loss.values(p, batch).sum() / self._weight(batch)
                return total

            return jvp(grad(weighted), (params,), ({n: vector[n] for n in params},))[1]
        scale = float(norm(vector))
        if scale == 0.0 or not math.isfinite(scale):
            return {n: torch.zeros_like(v) for n, v in vector.items()}
        plus = self.gradient({n: params[n] + (eps / scale) * vector[n] for n in params}, batches, rng)
        minus = self.gradient({n: params[n] - (eps / scale) * vector[n] for n in params}, batches, rng)
        return {n: (plus[n] - minus[n]) * (scale / (2 * eps)) for n in params}

    def central_hvp_and_dots(self, params: Params, batches: Sequence[Any], rng: Sequence[Tensor] | None, vector: Params, eps: float) -> tuple[Params, Tensor]:
        """``H_B vector`` and ``[<vector, G_i>]`` from the same two passes at ``params +- eps * vector/|vector|``.

        The per-sample losses of those passes give the dot products by the same central difference,
        so a model without ghost products needs no forward-mode pass per target (error O(eps^2)).
        """
        scale = float(norm(vector))
        if scale == 0.0 or not math.isfinite(scale):
            size = sum(int(b[INDEX_KEY].shape[0]) for b in batches)
            return {n: torch.zeros_like(v) for n, v in vector.items()}, torch.zeros(size, dtype=next(iter(params.values())).dtype, device=next(iter(params.values())).device)
        sides = []
        for sign in (1.0, -1.0):
            point = {n: params[n] + (sign * eps / scale) * vector[n] for n in params}
            total: Params | None = None
            losses = []
            for k, batch in enumerate(batches):
                weight = self._weight(batch)

                def weighted_sum(p: Params, batch: Any = batch, weight: int = weight) -> tuple[Tensor, Tensor]:
                    values = self.loss.values(p, batch)
                    return values.sum() / weight, values.detach()

                with self._rng(rng[k] if rng else None):
                    part, values = grad(weighted_sum, has_aux=True)(point)
                total = part if total is None else {n: total[n] + part[n] for n in total}
                losses.append(values)
            assert total is not None
            sides.append((total, torch.cat(losses)))
        (plus, plus_losses), (minus, minus_losses) = sides
        curvature = {n: (plus[n] - minus[n]) * (scale / (2 * eps)) for n in params}
        return curvature, (plus_losses - minus_losses) * (scale / (2 * eps))

    def clear(self) -> None:
        self.loss.clear_captures()
        self.capture.clear()
        self._per_sample = self._captured_at = None

    def close(self) -> None:
        """Remove the capture hooks from the user's module."""
        self.clear()
        self.capture.remove()


# ---------------------------------------------------------------------- the optimizer, forward and adjoint


@dataclass(frozen=True)
class _Hyper:
    group: int
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    kind: str = "sgd"  # "sgd", "adam" (L2 weight decay) or "adamw" (decoupled weight decay)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def _hyper_parameters(index: dict[str, Any], names: Sequence[str]) -> dict[str, _Hyper]:
    optimizer = index["optimizer"]
    if optimizer["class"] not in ("SGD", "Adam", "AdamW") or not str(optimizer["module"]).startswith("torch.optim"):
        raise TrajectoryLogError(
            f"`log_dir`: the run used optimizer {optimizer['module']}.{optimizer['class']}, which the replay cannot "
            f"handle: it supports {', '.join(SUPPORTED_OPTIMIZERS)}. Train with one of those to replay, or use "
            "DiffInCallback's in-run scores for this run."
        )
    hyper: dict[str, _Hyper] = {}
    for number, group in enumerate(optimizer["groups"]):
        h = group["hyper"]
        if h.get("maximize") or h.get("amsgrad"):
            raise TrajectoryLogError(
                f"`log_dir`: the run's {optimizer['class']} has {'maximize' if h.get('maximize') else 'amsgrad'}=True, which the "
                f"replay does not handle; it supports {', '.join(SUPPORTED_OPTIMIZERS)}."
            )
        kind = "sgd"
        if optimizer["class"] in ("Adam", "AdamW"):
            kind = "adamw" if optimizer["class"] == "AdamW" or h.get("decoupled_weight_decay") else "adam"
        betas = h.get("betas", (0.9, 0.999))
        for name in group["params"]:
            hyper[name] = _Hyper(
                number, float(h.get("momentum", 0.0)), float(h.get("dampening", 0.0)), bool(h.get("nesterov", False)), float(h.get("weight_decay", 0.0)),
                kind, float(betas[0]), float(betas[1]), float(h.get("eps", 1e-8)),
            )
    missing = [name for name in names if name not in hyper]
    if missing:
        raise TrajectoryLogError(f"`log_dir`: trainable parameters {missing} are in no optimizer group of the log; the replay needs every one to be optimised.")
    return hyper


def _norm_clip_projection(gradient: Params) -> Callable[[Params], Params]:
    """``q -> (1/c) J^T q`` for a step clipped by norm, ``J`` the Jacobian of ``c(G) G`` in ``G``.

    Lightning clips by ``c = C / (|G| + 1e-6)`` where that is below 1 (torch.nn.utils.clip_grad_norm_),
    so ``c G = C G / (|G| + 1e-6)`` and ``J = c (I - kappa g g^T)``, ``g = G/|G|``, ``kappa = |G| / (|G| +
    1e-6)``: removing a sample changes the clipped step's length by nothing to first order, only its
    direction. The adjoint keeps the factor ``c`` outside (as for an unclipped step scaled by ``c``).
    """
    total = norm(gradient)
    kappa = total / (total + CLIP_NORM_EPS)
    unit = {name: value / total for name, value in gradient.items()}

    def project(q: Params) -> Params:
        along = kappa * sum((q[name] * unit[name]).sum() for name in q)
        return {name: q[name] - along * unit[name] for name in q}

    return project


def _sgd_step(params: Params, velocity: Params, gradient: Params, lr: Sequence[float], hyper: Mapping[str, _Hyper], clip: float) -> tuple[Params, Params]:
    """One step of torch.optim.SGD (single-tensor form), functionally; returns new (params, velocity)."""
    new_params, new_velocity = {}, dict(velocity)
    for name, theta in params.items():
        h = hyper[name]
        d = gradient[name] * clip if clip != 1.0 else gradient[name]
        if h.weight_decay != 0:
            d = d.add(theta, alpha=h.weight_decay)
        if h.momentum != 0:
            buf = velocity.get(name)
            buf = d.clone() if buf is None else buf.mul(h.momentum).add(d, alpha=1 - h.dampening)
            new_velocity[name] = buf
            d = d.add(buf, alpha=h.momentum) if h.nesterov else buf
        new_params[name] = theta.add(d, alpha=-lr[h.group])
    return new_params, new_velocity


def _adam_step(
    params: Params, moments: dict[str, tuple[Tensor, Tensor]], gradient: Params, lr: Sequence[float], hyper: Mapping[str, _Hyper], clip: float, step: int
) -> tuple[Params, dict[str, tuple[Tensor, Tensor]]]:
    """One step of torch.optim.Adam / AdamW (single-tensor form), functionally; ``step`` counts this step."""
    new_params, new_moments = {}, {}
    for name, theta in params.items():
        h = hyper[name]
        eta = lr[h.group]
        g = gradient[name] * clip if clip != 1.0 else gradient[name]
        if h.kind == "adamw":
            theta = theta.mul(1 - eta * h.weight_decay)
        elif h.weight_decay != 0:
            g = g.add(theta, alpha=h.weight_decay)
        m, v = moments.get(name, (torch.zeros_like(theta), torch.zeros_like(theta)))
        m = m.lerp(g, 1 - h.beta1)
        v = v.mul(h.beta2).addcmul(g, g, value=1 - h.beta2)
        denom = (v.sqrt() / (1 - h.beta2**step) ** 0.5).add(h.eps)
        new_params[name] = theta.addcdiv(m, denom, value=-eta / (1 - h.beta1**step))
        new_moments[name] = (m, v)
    return new_params, new_moments


def _adam_adjoint_step(
    a_theta: Params, a_moments: Mapping[str, Any], theta: Params, gradient: Params, moments: Mapping[str, tuple[Tensor, Tensor]],
    lr: Sequence[float], hyper: Mapping[str, _Hyper], clip: float, step: int,
) -> tuple[Params, dict[str, tuple[Tensor, Tensor]], Params]:
    """Adam's adjoint through one step: ``(q, (a_m, a_v), a_theta without the H q term)``.

    With ``g = c G_B + wd theta`` (L2) the step is ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2``,
    ``theta' = d theta - s m' / (sqrt(v'/bc2) + eps)`` (``d = 1 - lr wd`` for AdamW, else 1; ``s = lr/bc1``).
    Linearised: ``A_m = a_m' + (d theta'/d m') a_theta'``, ``A_v = a_v' + (d theta'/d v') a_theta'``, then
    ``a_m = b1 A_m``, ``a_v = b2 A_v``, the coefficient of ``delta g`` is ``q = (1-b1) A_m + 2 (1-b2) g A_v``,
    and ``a_theta = d a_theta' + c H_B q (+ wd q for L2)``; sample i of the step gets ``-c w_i <q, G_i>``.
    """
    q, new_moments, direct = {}, {}, {}
    for name, a in a_theta.items():
        h = hyper[name]
        eta = lr[h.group]
        g = gradient[name] * clip if clip != 1.0 else gradient[name]
        if h.kind == "adam" and h.weight_decay != 0:
            g = g.add(theta[name], alpha=h.weight_decay)
        m_prev, v_prev = moments.get(name, (torch.zeros_like(a), torch.zeros_like(a)))
        m = m_prev.lerp(g, 1 - h.beta1)
        v = v_prev.mul(h.beta2).addcmul(g, g, value=1 - h.beta2)
        bc1, bc2_sqrt = 1 - h.beta1**step, (1 - h.beta2**step) ** 0.5
        root = v.sqrt()
        denom = root / bc2_sqrt + h.eps
        d_m = -(eta / bc1) / denom
        # d sqrt(v)/dv = 1/(2 sqrt v); where v = 0 the gradient entry was 0 and so is m: no dependence.
        d_v = torch.where(root > 0, (eta / bc1) * m / denom**2 / (bc2_sqrt * 2 * root.clamp_min(torch.finfo(root.dtype).tiny)), torch.zeros_like(root))
        a_m, a_v = a_moments.get(name, (torch.zeros_like(a), torch.zeros_like(a)))
        big_m, big_v = a_m + d_m * a, a_v + d_v * a
        new_moments[name] = (h.beta1 * big_m, h.beta2 * big_v)
        q[name] = (1 - h.beta1) * big_m + 2 * (1 - h.beta2) * g * big_v
        direct[name] = a * (1 - eta * h.weight_decay) if h.kind == "adamw" else a
    return q, new_moments, direct


def _adjoint_step(
    a_theta: Params, a_velocity: Params, lr: Sequence[float], hyper: Mapping[str, _Hyper], has_velocity: bool
) -> tuple[Params, Params]:
    """``(q, mu_e r)`` of the derivation in the module docstring, per parameter."""
    q, new_velocity = {}, {}
    for name, a in a_theta.items():
        h = hyper[name]
        eta = lr[h.group]
        if h.momentum == 0:
            q[name] = -eta * a
            new_velocity[name] = torch.zeros_like(a)
            continue
        mu_e, c_e = (h.momentum, 1 - h.dampening) if has_velocity else (0.0, 1.0)
        a_v = a_velocity.get(name, torch.zeros_like(a))
        if h.nesterov:
            r = a_v - eta * h.momentum * a
            q[name] = c_e * r - eta * a
        else:
            r = a_v - eta * a
            q[name] = c_e * r
        new_velocity[name] = mu_e * r
    return q, new_velocity


# ---------------------------------------------------------------------- data


def _batch_of(dataset: IndexedDataset, ids: Tensor, device: torch.device) -> dict[str, Any]:
    inner = dataset.dataset
    if isinstance(inner, TensorDataset) and len(inner.tensors) == 2:
        # The collated form of IndexedDataset items, without a Python loop over samples.
        batch = {INDEX_KEY: ids, "input": inner.tensors[0][ids], "target": inner.tensors[1][ids]}
    else:
        batch = default_collate([dataset[int(i)] for i in ids])
    return move_data_to_device(batch, device)


def _target_batches(name: str, data: Any, batch_size: int, device: torch.device) -> list[Any]:
    if isinstance(data, DataLoader):
        batches = list(data)
    elif isinstance(data, Dataset) or (isinstance(data, (list, tuple)) and len(data) > 0):
        indexed = data if isinstance(data, IndexedDataset) else IndexedDataset(data)  # type: ignore[arg-type]
        batches = list(DataLoader(indexed, batch_size=batch_size, shuffle=False))
    else:
        raise TrajectoryLogError(
            f"`targets[{name!r}]` must be a Dataset, a DataLoader or a non-empty list of test points; got "
            f"{type(data).__name__}{' (empty)' if isinstance(data, (list, tuple)) else ''}."
        )
    if not batches:
        raise TrajectoryLogError(f"`targets[{name!r}]` yields no batches; pass a non-empty target.")
    return [move_data_to_device(batch, device) for batch in batches]


# ---------------------------------------------------------------------- checks


def _check_segments(index: dict[str, Any], log_dir: Path) -> list[dict[str, Any]]:
    if not index.get("complete"):
        raise TrajectoryLogError(
            f"`log_dir` {log_dir}: the run that wrote this log did not finish (no final parameters; complete=false). "
            "Resume the fit from its last Lightning checkpoint so the log is completed, then replay."
        )
    segments = sorted(index["segments"], key=lambda s: s["start"])
    checkpoints = set(index["checkpoints"])
    expected = 0
    for segment in segments:
        if segment["start"] != expected:
            raise TrajectoryLogError(
                f"`log_dir` {log_dir}: the log has no segment for steps {expected}..{segment['start'] - 1} (missing "
                "segment); the replay needs every step. Re-record the run, or resume it from a Lightning checkpoint "
                "taken before those steps."
            )
        if segment["start"] not in checkpoints:
            raise TrajectoryLogError(f"`log_dir` {log_dir}: segment starting at step {segment['start']} has no checkpoint ({checkpoint_file(segment['start'])}); re-record the run.")
        expected = segment["start"] + segment["num_steps"]
    if expected != index["final_step"]:
        raise TrajectoryLogError(
            f"`log_dir` {log_dir}: the segments cover steps 0..{expected - 1} but the run ended at step "
            f"{index['final_step']} (missing segment); re-record the run."
        )
    return segments


def _check_module(module: nn.Module, index: dict[str, Any], final: Params, tolerance: float) -> list[str]:
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    logged = index["parameters"]
    mismatched = [
        f"{name}: {list(p.shape)} {str(p.dtype).replace('torch.', '')} vs log {logged.get(name)}"
        for name, p in module.named_parameters()
        if p.requires_grad and (name not in logged or logged[name]["shape"] != list(p.shape) or logged[name]["dtype"] != str(p.dtype).replace("torch.", ""))
    ]
    missing = [name for name in logged if name not in names]
    if mismatched or missing:
        raise TrajectoryLogError(
            "`module`'s parameters do not match the log (every trainable parameter must have the name, shape and "
            f"dtype the run had): {'; '.join(mismatched + [f'{m}: in the log, not in module' for m in missing])}. "
            "Pass the model class and precision the run trained (e.g. load it from the run's checkpoint)."
        )
    own = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    difference = math.sqrt(sum(float(torch.sum((own[n].to(final[n]) - final[n]) ** 2)) for n in names))
    size = math.sqrt(sum(float(torch.sum(final[n] ** 2)) for n in names)) or 1.0
    if difference / size > tolerance:
        raise TrajectoryLogError(
            f"`module`'s parameters differ from the log's final parameters by {difference / size:.3g} relative (the "
            f"rule: at most {tolerance:g}): the log comes from another run, or module is not the trained model. Pass "
            "the module that run trained (after fit, or loaded from its last checkpoint) and that run's log."
        )
    return names


# ---------------------------------------------------------------------- the replay


def trajectory_influence(
    module: nn.Module,
    log_dir: str | Path,
    train_dataset: Dataset,
    targets: Mapping[str, Any],
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    hvp: HvpMode = "central",
    eps: float | None = None,
    output_dir: str | Path | None = None,
    max_states_in_memory: int | None = None,
    replay_tolerance: float | None = None,
    target_batch_size: int = 256,
    progress: bool = True,
) -> InfluenceResult:
    """Exact SGD-influence of every training sample on each target, from a run's trajectory log.

    Args:
        module: the trained LightningModule (or any ``nn.Module``); its trainable parameters must be
            the log's final parameters. Left in the state it came in.
        log_dir: the ``output_dir`` of the run's :class:`~diffin_lightning.TrajectoryLog`.
        train_dataset: the training set, indexed by sample id as in the run (an
            :class:`IndexedDataset`, or the dataset it wrapped); checked against the log's fingerprint.
        targets: name -> a Dataset, a DataLoader or a list of test points; the target loss is the
            mean per-sample loss over it, at the final parameters. Several are replayed together.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``; default ``module.per_sample_loss(batch)``.
        hvp: ``"central"`` (finite difference of two batch gradients, error O(eps^2)) or ``"exact"``
            (forward-over-reverse double backward).
        eps: the central difference's step along the unit direction; default
            ``machine_eps**(1/3) * max(1, |theta|)``.
        output_dir: when given, the result is also written there (``influence.safetensors`` +
            ``influence.json``), after every check has passed.
        max_states_in_memory: at most this many parameter sets of a segment are held at once; longer
            segments are re-checkpointed inside (every ``ceil(sqrt(n))`` steps) and each piece is
            replayed again on the way back (one more forward pass per step). ``None``: as many as
            fit in 1 GiB (at least 2, at most 4096).
        replay_tolerance: the largest relative distance ``|theta_replayed - theta_logged| / |theta_logged|``
            at the end of a segment before a warning; default 1e-8 in float64, 1e-4 in float32.
        target_batch_size: batch size for Dataset targets.
        progress: show a progress bar over the replayed steps.

    Returns:
        An :class:`InfluenceResult` with one target per name: ``diffin`` (and ``first_order``) hold the
        replayed SGD-influence, ``second_order`` is 0, ``visits`` counts the steps each sample was in;
        ``metadata["schedule"] == "replay"``. Sign: positive = the sample helped (DESIGN.md).

    Raises:
        TrajectoryLogError: a log from another run or data set, a missing segment or file, an optimizer the
            replay cannot handle, a model whose parameters do not match the log, a bad argument. Nothing is
            written when it is raised.

    Example::

        >>> # after trainer.fit(model, ...) with TrajectoryLog(output_dir="runs/x/trajectory") attached:
        >>> # scores = trajectory_influence(model, "runs/x/trajectory", train_set, {"test": test_set})
        >>> # scores["test"].diffin  -> tensor [N]
    """
    started = time.perf_counter()
    if hvp not in HVP_MODES:
        raise TrajectoryLogError(f"`hvp` must be one of {HVP_MODES}; got {hvp!r}.")
    if eps is not None and not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise TrajectoryLogError(f"`eps` must be a positive finite number or None (auto); got {eps!r}.")
    if max_states_in_memory is not None and (isinstance(max_states_in_memory, bool) or not isinstance(max_states_in_memory, int) or max_states_in_memory < 2):
        raise TrajectoryLogError(f"`max_states_in_memory` must be an int >= 2 or None (auto); got {max_states_in_memory!r}.")
    if not isinstance(targets, Mapping) or not targets:
        raise TrajectoryLogError(f"`targets` must be a non-empty mapping of name -> Dataset, DataLoader or list of test points; got {type(targets).__name__}.")
    log_dir = Path(log_dir)
    index = read_index(log_dir)
    segments = _check_segments(index, log_dir)
    if index.get("gradient_clip_algorithm") not in (None, "norm"):
        raise TrajectoryLogError(
            f"`log_dir`: the run clipped gradients by {index['gradient_clip_algorithm']}, which is not one factor per step; "
            "the replay handles norm clipping (gradient_clip_algorithm='norm') or none."
        )
    dataset = train_dataset if isinstance(train_dataset, IndexedDataset) else IndexedDataset(train_dataset)
    fingerprint = dataset_fingerprint(dataset)
    if index.get("fingerprint") is not None and fingerprint != index["fingerprint"]:
        raise TrajectoryLogError(
            f"`train_dataset` has fingerprint {fingerprint!r} (N={len(dataset)}), but the log was recorded on a training "
            f"set with fingerprint {index['fingerprint']!r} (N={index['num_samples']}): a log from another data set. "
            "Pass the training set of that run, in the same order and with the same labels."
        )
    final_tensors, _ = read_tensors(log_dir / index.get("final_file", FINAL_FILE))
    final = {key[len("param/") :]: value for key, value in final_tensors.items() if key.startswith("param/")}
    some = next(module.parameters())
    device, dtype = some.device, some.dtype
    final = {n: v.to(device) for n, v in final.items()}
    tolerance_default = 1e-8 if dtype == torch.float64 else 1e-4
    names = _check_module(module, index, final, 1e-3)
    final = {n: final[n] for n in names}  # one parameter order everywhere (torch.func compares structures)
    hyper = _hyper_parameters(index, names)
    if loss_fn is None:
        if not hasattr(module, "per_sample_loss"):
            raise TrajectoryLogError("`loss_fn` is required when `module` has no `per_sample_loss(batch)` method; pass loss_fn(module, batch) -> Tensor[B].")
        loss_fn = lambda m, batch: m.per_sample_loss(batch)  # noqa: E731
    tolerance = tolerance_default if replay_tolerance is None else replay_tolerance
    if max_states_in_memory is None:
        # A stored state is the parameters plus, with momentum, the velocity.
        factor = 3 if any(h.kind != "sgd" for h in hyper.values()) else 2 if any(h.momentum for h in hyper.values()) else 1
        state_bytes = sum(v.numel() * v.element_size() for v in final.values()) * factor
        max_states_in_memory = int(min(MAX_AUTO_STATES, max(2, AUTO_STATE_BYTES // max(1, state_bytes))))
    engine = _StepEngine(module, loss_fn, int(index["accumulate_grad_batches"]))

    was_training = module.training
    try:
        module.eval()  # the target loss is the evaluated model's
        target_gradients = {
            name: engine.loss.batch_gradient(final, _target_batches(name, data, target_batch_size, device)) for name, data in targets.items()
        }
        module.train()  # the replay repeats training's forward (dropout on)
        scale_eps = (eps if eps is not None else torch.finfo(dtype).eps ** (1 / 3))
        num_samples = len(dataset)
        scores = {name: torch.zeros(num_samples, dtype=torch.float64, device=device) for name in targets}
        visits = torch.zeros(num_samples, dtype=torch.float64)
        adjoints: dict[str, tuple[Params, Any]] = {name: (g, {}) for name, g in target_gradients.items()}  # optimizer-state adjoints start at 0
        drifts: list[float] = []
        timings = {"forward": 0.0, "adjoint": 0.0}
        from tqdm.auto import tqdm

        bar = tqdm(total=int(index["final_step"]), desc="replay", disable=not progress, unit="step")
        for number in range(len(segments) - 1, -1, -1):
            segment = segments[number]
            start_tensors, start_meta = read_tensors(log_dir / checkpoint_file(segment["start"]))
            if start_meta.get("run_id") != index["run_id"]:
                raise TrajectoryLogError(f"`log_dir`: {checkpoint_file(segment['start'])} belongs to run {start_meta.get('run_id')!r}, not {index['run_id']!r}; files of two runs are mixed. Re-record the run.")
            if number + 1 < len(segments):
                end_tensors, _ = read_tensors(log_dir / checkpoint_file(segments[number + 1]["start"]))
                end = {key[len("param/") :]: v.to(device) for key, v in end_tensors.items() if key.startswith("param/")}
            else:
                end = final
            records = read_segment(log_dir, segment, index["run_id"])
            params = {n: start_tensors[f"param/{n}"].to(device) for n in names}
            velocity: dict[str, Any] = {n: start_tensors[f"optim/{n}/momentum_buffer"].to(device) for n in names if f"optim/{n}/momentum_buffer" in start_tensors}
            optimizer_steps = 0
            if next(iter(hyper.values())).kind != "sgd":
                velocity = {
                    n: (start_tensors[f"optim/{n}/exp_avg"].to(device), start_tensors[f"optim/{n}/exp_avg_sq"].to(device))
                    for n in names
                    if f"optim/{n}/exp_avg" in start_tensors
                }
                steps_logged = [int(start_tensors[f"optim/{n}/step"]) for n in names if f"optim/{n}/step" in start_tensors]
                optimizer_steps = steps_logged[0] if steps_logged else 0
            drift = _replay_segment(
                engine, dataset, records, params, velocity, end, hyper, adjoints, scores, visits, device, hvp, scale_eps, max_states_in_memory, bar, timings,
                optimizer_steps,
            )
            drifts.append(drift)
            if drift > tolerance:
                warnings.warn(
                    f"trajectory_influence: replaying steps {segment['start']}..{segment['start'] + segment['num_steps'] - 1} "
                    f"ends {drift:.3g} (relative) away from the parameters the run logged, above replay_tolerance={tolerance:g}. "
                    "The scores of this segment are computed along the replayed path. Causes: nondeterministic kernels, "
                    "data augmentation or randomness the log did not record, a training_step that is not the mean of "
                    "per_sample_loss; a smaller checkpoint_every_n_steps re-anchors the replay more often.",
                    stacklevel=2,
                )
        bar.close()
    finally:
        engine.close()
        module.train(was_training)

    metadata = {
        "library": "diffin_lightning",
        "library_version": __version__,
        "num_samples": num_samples,
        "targets": list(targets),
        "fingerprint": fingerprint,
        "schedule": "replay",
        "second_order": "none",
        "components": SIGN_NOTE,
        "finite_difference": hvp,
        "hvp": hvp,
        "eps": "auto" if eps is None else eps,
        "steps_recorded": int(index["final_step"]),
        "log_dir": str(log_dir),
        "log_run_id": index["run_id"],
        "replay_drift_max": max(drifts) if drifts else 0.0,
        "replay_tolerance": tolerance,
        "seconds": round(time.perf_counter() - started, 3),
        "seconds_forward_replay": round(timings["forward"], 3),
        "seconds_adjoint": round(timings["adjoint"], 3),
        "complete": True,
    }
    result = InfluenceResult(
        targets={
            name: TargetInfluence(
                name=name,
                kind="dataset",
                first_order=scores[name].cpu().clone(),
                second_order=torch.zeros(num_samples, dtype=torch.float64),
                diffin=scores[name].cpu(),
                visits=visits.clone(),
            )
            for name in targets
        },
        metadata=metadata,
    )
    if output_dir is not None:
        save_influence(result, output_dir)
    return result


@dataclass
class _State:
    step_offset: int  # position inside the segment
    params: Params
    velocity: Params  # SGD: momentum buffers; Adam: name -> (exp_avg, exp_avg_sq)
    optimizer_steps: int = 0  # Adam's step count before this state's step


def _replay_segment(
    engine: _StepEngine,
    dataset: IndexedDataset,
    records: Segment,
    params: Params,
    velocity: Params,
    logged_end: Params,
    hyper: Mapping[str, _Hyper],
    adjoints: dict[str, tuple[Params, Params]],
    scores: dict[str, Tensor],
    visits: Tensor,
    device: torch.device,
    hvp: HvpMode,
    eps_scale: float,
    max_states: int,
    bar: Any,
    timings: dict[str, float],
    optimizer_steps: int = 0,
) -> float:
    """Forward through the segment (inner checkpoints), verify the end, then the adjoint backwards. Returns the drift."""
    n = len(records.steps)
    stride = 1 if n <= max_states else math.ceil(math.sqrt(n))
    batches_cache: dict[int, list[Any]] = {}

    def batches(k: int) -> list[Any]:
        if k not in batches_cache:
            batches_cache.clear()  # one step's batches at a time: the training set may not fit on the device
            batches_cache[k] = [_batch_of(dataset, ids, device) for ids in records.ids[k]]
        return batches_cache[k]

    def rng(k: int) -> list[Any] | None:
        if records.rng is None:
            return None
        if records.rng_cuda is not None:
            return list(zip(records.rng[k], records.rng_cuda[k]))
        return records.rng[k]

    def step_forward(k: int, state: _State) -> _State:
        clock = time.perf_counter()
        try:
            return _step_forward(k, state)
        finally:
            timings["forward"] += time.perf_counter() - clock

    def _step_forward(k: int, state: _State) -> _State:
        if bool(records.skipped[k]):
            return _State(k + 1, state.params, state.velocity, state.optimizer_steps)
        gradient = engine.gradient(state.params, batches(k), rng(k))
        lr, clip = records.lr[k].tolist(), float(records.clip[k])
        if adam:
            new_params, new_moments = _adam_step(state.params, state.velocity, gradient, lr, hyper, clip, state.optimizer_steps + 1)
            return _State(k + 1, new_params, new_moments, state.optimizer_steps + 1)  # type: ignore[arg-type]
        new_params, new_velocity = _sgd_step(state.params, state.velocity, gradient, lr, hyper, clip)
        return _State(k + 1, new_params, new_velocity)

    adam = next(iter(hyper.values())).kind != "sgd"
    # Level 1: the inner checkpoints, every `stride` steps (every step for a short segment).
    state = _State(0, params, velocity, optimizer_steps)
    inner: list[_State] = []
    for k in range(n):
        if k % stride == 0:
            inner.append(state)
        state = step_forward(k, state)
    difference = math.sqrt(sum(float(torch.sum((state.params[name] - logged_end[name]) ** 2)) for name in state.params))
    size = math.sqrt(sum(float(torch.sum(logged_end[name] ** 2)) for name in logged_end)) or 1.0
    drift = difference / size

    # Level 2: each piece replayed again (when stride > 1), then the adjoint backwards through it.
    for checkpoint in reversed(inner):
        piece = [checkpoint]
        stop = min(checkpoint.step_offset + stride, n)
        while piece[-1].step_offset + 1 < stop:
            piece.append(step_forward(piece[-1].step_offset, piece[-1]))
        for state in reversed(piece):
            clock = time.perf_counter()
            _adjoint_through_step(engine, records, state, batches, rng, hyper, adjoints, scores, visits, hvp, eps_scale)
            timings["adjoint"] += time.perf_counter() - clock
            bar.update(1)
    return drift


def _adjoint_through_step(
    engine: _StepEngine,
    records: Segment,
    state: _State,
    batches: Callable[[int], list[Any]],
    rng: Callable[[int], list[Tensor] | None],
    hyper: Mapping[str, _Hyper],
    adjoints: dict[str, tuple[Params, Params]],
    scores: dict[str, Tensor],
    visits: Tensor,
    hvp: HvpMode,
    eps_scale: float,
) -> None:
    k = state.step_offset
    if bool(records.skipped[k]):
        return  # AMP skipped the update: no contribution, the adjoint passes through unchanged
    step_batches, step_rng = batches(k), rng(k)
    lr, clip = records.lr[k].tolist(), float(records.clip[k])
    theta = state.params
    has_velocity = bool(state.velocity)
    ids = torch.cat(list(records.ids[k])).to(scores[next(iter(scores))].device)
    weights = torch.cat([torch.full((len(m),), 1.0 / (engine.accumulate * len(m)), dtype=torch.float64) for m in records.ids[k]]).to(ids.device)
    visits.index_add_(0, ids.cpu(), torch.ones(len(ids), dtype=torch.float64))
    ghost = engine.uses_ghost(theta)
    adam = next(iter(hyper.values())).kind != "sgd"
    gradient: Params | None = None
    if ghost or adam or clip < 1.0:
        # One pass shared by every target: the ghost dot products' activations, Adam's gradient, the clipped direction.
        gradient = engine.gradient(theta, step_batches, step_rng, keep_captures=ghost)
    clipped = None if clip >= 1.0 else _norm_clip_projection(gradient)  # type: ignore[arg-type]
    eps = eps_scale * max(1.0, float(norm(theta)))
    for name, (a_theta, a_velocity) in adjoints.items():
        if adam:
            assert gradient is not None
            q, new_velocity, a_direct = _adam_adjoint_step(a_theta, a_velocity, theta, gradient, state.velocity, lr, hyper, clip, state.optimizer_steps + 1)  # type: ignore[assignment,arg-type]
        else:
            q, new_velocity = _adjoint_step(a_theta, a_velocity, lr, hyper, has_velocity)
            a_direct = a_theta
        # q is the adjoint of the clipped gradient c G; what reaches G (its curvature, each sample) is q through c G's Jacobian.
        q_gradient = q if clipped is None else clipped(q)
        if hvp == "central" and not ghost:
            # No ghost products: the dot products ride on the finite difference's two passes.
            curvature, dots = engine.central_hvp_and_dots(theta, step_batches, step_rng, q_gradient, eps)
        else:
            dots = engine.dots(theta, step_batches, step_rng, q_gradient)
            curvature = engine.hvp(theta, step_batches, step_rng, q_gradient, hvp, eps)
        scores[name].index_add_(0, ids, -clip * weights * dots.to(torch.float64))
        # The L2 weight decay of SGD and Adam adds wd * theta to the gradient; AdamW's is in a_direct.
        new_theta = {n: a_direct[n] + clip * curvature[n] + (hyper[n].weight_decay * q[n] if hyper[n].kind != "adamw" else 0.0) for n in a_theta}
        adjoints[name] = (new_theta, new_velocity)
    engine.clear()
