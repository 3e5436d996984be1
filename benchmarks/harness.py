"""Ground truth for influence: trajectory-specific leave-one-out and exact SGD-influence.

- :class:`TrajectoryRecorder` (a real Lightning callback) stores what a run did: the
  parameters each optimizer step started from, its learning rate and its sample ids.
- :func:`replay_sgd` replays that run for many models at once (``torch.func.vmap``),
  each with its own per-sample loss weights: weight 0 for sample j in every batch that
  held it, same order, same denominator |B|. That is DESIGN.md's leave-one-out.
- :func:`leave_one_out_truth` gives ``L_V(theta^-j) - L_V(theta)`` for chosen ids.
- :func:`exact_sgd_influence` is Hara et al. (2019): the target gradient propagated
  backwards through ``(I - eta H_B)`` along the stored trajectory with exact
  Hessian-vector products; the accuracy ceiling of a linearised estimator.

Everything is float64 when the model is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap

Params = dict[str, Tensor]
# per_sample_loss(params, inputs, labels) -> Tensor[B]
FunctionalLoss = Callable[[Params, Tensor, Tensor], Tensor]


@dataclass
class StepRecord:
    step: int
    lr: float
    ids: list[int]
    params: Params
    # the CPU RNG state the step's training forward started from (its dropout masks); replays restore it
    rng_state: Tensor | None = None


@dataclass
class TrajectoryRecorder(pl.Callback):
    """Records every optimizer step's starting parameters, learning rate and sample ids, and the final parameters."""

    steps: list[StepRecord] = field(default_factory=list)
    final: Params = field(default_factory=dict)
    _pending: list[int] = field(default_factory=list)
    _rng_state: Tensor | None = None

    def __hash__(self) -> int:
        return id(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._pending:
            self._rng_state = torch.get_rng_state()
        self._pending += batch["index"].tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.steps.append(
            StepRecord(trainer.global_step, float(optimizer.param_groups[0]["lr"]), self._pending, params, self._rng_state)
        )
        self._pending = []

    def on_train_end(self, trainer, pl_module):
        self.final = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


def functional_cross_entropy(model: torch.nn.Module, training: bool | None = None) -> FunctionalLoss:
    """Per-sample cross-entropy of ``model`` as a function of its parameters.

    ``training`` evaluates it in train (``True``: dropout on) or eval (``False``) mode; ``None``
    in whatever mode the model is in.
    """

    def loss(params: Params, inputs: Tensor, labels: Tensor) -> Tensor:
        mode = model.training
        model.train(mode if training is None else training)
        try:
            return torch.nn.functional.cross_entropy(functional_call(model, params, (inputs,)), labels, reduction="none")
        finally:
            model.train(mode)

    return loss


def replay_sgd(loss: FunctionalLoss, steps: Sequence[StepRecord], inputs: Tensor, labels: Tensor, weights: Tensor) -> Params:
    """Final parameters of ``K`` SGD runs replaying ``steps``, run ``k`` weighting sample ``i``'s loss by ``weights[k, i]``.

    The first recorded parameters are the common start; each step uses the recorded ids
    and learning rate and the denominator ``|B|`` whatever the weights.
    """
    start = steps[0].params
    stacked = {name: value.unsqueeze(0).repeat(weights.shape[0], *[1] * value.dim()) for name, value in start.items()}

    def weighted_batch_loss(params: Params, sample_weights: Tensor, batch_inputs: Tensor, batch_labels: Tensor) -> Tensor:
        return (sample_weights * loss(params, batch_inputs, batch_labels)).sum() / batch_labels.shape[0]

    # randomness="same": every replayed model draws the step's one dropout mask (restored from the
    # recorded state), so weight 0 is the only difference between them and the original run.
    gradient = vmap(grad(weighted_batch_loss), in_dims=(0, 0, None, None), randomness="same")
    for record in steps:
        ids = torch.tensor(record.ids)
        with _training_masks(record):
            update = gradient(stacked, weights[:, ids], inputs[ids], labels[ids])
        stacked = {name: value - record.lr * update[name] for name, value in stacked.items()}
    return stacked


def mean_target_loss(loss: FunctionalLoss, stacked: Params, inputs: Tensor, labels: Tensor) -> Tensor:
    """``L_V`` of every replayed model: ``[K]``."""
    return vmap(lambda params: loss(params, inputs, labels).mean())(stacked)


def leave_one_out_truth(
    loss: FunctionalLoss,
    steps: Sequence[StepRecord],
    train: tuple[Tensor, Tensor],
    target: tuple[Tensor, Tensor],
    ids: Sequence[int],
    chunk: int = 64,
    target_loss: FunctionalLoss | None = None,
) -> tuple[Tensor, Params]:
    """``truth[j] = L_V(theta^-j) - L_V(theta)`` for each id, and the full replay's final parameters.

    Models are replayed ``chunk`` at a time (plus the full model in every chunk, so each
    difference is taken within one batched computation). ``target_loss`` (default ``loss``)
    measures ``L_V``: for a dropout model, the eval-mode loss.
    """
    inputs, labels = train
    n = len(labels)
    truths = []
    full_params: Params = {}
    for start in range(0, len(ids), chunk):
        part = list(ids[start : start + chunk])
        weights = torch.ones(len(part) + 1, n, dtype=inputs.dtype)
        for row, sample in enumerate(part, start=1):
            weights[row, sample] = 0.0
        final = replay_sgd(loss, steps, inputs, labels, weights)
        losses = mean_target_loss(target_loss or loss, final, *target)
        truths.append(losses[1:] - losses[0])
        full_params = {name: value[0] for name, value in final.items()}
    return torch.cat(truths), full_params


def exact_sgd_influence(
    loss: FunctionalLoss,
    steps: Sequence[StepRecord],
    final: Params,
    train: tuple[Tensor, Tensor],
    target: tuple[Tensor, Tensor],
    target_loss: FunctionalLoss | None = None,
) -> Tensor:
    """Hara et al. (2019) for every training sample: ``sum_{t: i in B_t} (eta_t/|B_t|) <u_{t+1}, G_i(theta_t)>``.

    ``u_T = grad L_V(theta_T)`` and ``u_t = (I - eta_t H_{B_t}(theta_t)) u_{t+1}``, with exact
    Hessian-vector products (forward-over-reverse).
    """
    inputs, labels = train
    influence = torch.zeros(len(labels), dtype=inputs.dtype)
    direction = grad(lambda p: (target_loss or loss)(p, *target).mean())(final)
    for record in reversed(steps):
        ids = torch.tensor(record.ids)
        batch_inputs, batch_labels = inputs[ids], labels[ids]
        with _training_masks(record):
            _, dots = jvp(lambda p: loss(p, batch_inputs, batch_labels), (record.params,), (direction,))
        influence.index_add_(0, ids, record.lr / len(ids) * dots)
        with _training_masks(record):
            _, hvp = jvp(grad(lambda p: loss(p, batch_inputs, batch_labels).mean()), (record.params,), (direction,))
        direction = {name: value - record.lr * hvp[name] for name, value in direction.items()}
    return influence


@contextmanager
def _training_masks(record: StepRecord) -> Iterator[None]:
    """Draw the recorded step's dropout masks (a no-op for models without randomness)."""
    with torch.random.fork_rng(devices=[]):
        if record.rng_state is not None:
            torch.set_rng_state(record.rng_state)
        yield


def parameters_close(a: Params, b: Params, rtol: float = 1e-9) -> bool:
    return all(torch.allclose(a[name], b[name], rtol=rtol, atol=rtol) for name in a)


def paired_spearman_difference(
    scores: Tensor, reference: Tensor, truth: Tensor, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``rho(scores, truth) - rho(reference, truth)`` and its paired bootstrap interval over the ids.

    Both estimators are scored on the same resampled ids each time (the ids are the unit that
    was sampled: a fidelity figure from 100 ids is itself an estimate). Returns ``(difference,
    low, high)``, the interval at ``level`` (percentile bootstrap). Where the interval is wider
    than a bar on the difference, the benchmark cannot tell whether the bar is met.
    """
    from torchmetrics.functional import spearman_corrcoef

    def rho(values: Tensor, index: Tensor) -> Tensor:
        return spearman_corrcoef(values[index].double(), truth[index].double())

    everything = torch.arange(len(truth))
    difference = float(rho(scores, everything) - rho(reference, everything))
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(truth), (resamples, len(truth)), generator=generator)
    differences = torch.stack([rho(scores, index) - rho(reference, index) for index in draws])
    tail = (1.0 - level) / 2
    low, high = torch.quantile(differences, torch.tensor([tail, 1.0 - tail], dtype=differences.dtype)).tolist()
    return difference, low, high
