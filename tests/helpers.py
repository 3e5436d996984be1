"""Tiny models, a trajectory recorder and brute-force references for the float64 tests.

The references loop over samples in Python and take Hessian-vector products by
double backward through autograd: slow, obvious, and independent of the
library's torch.func code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from diffin_lightning import EpochSeededSampler, IndexedDataset

RTOL = 1e-6  # exact parts, float64


class TinyClassifier(pl.LightningModule):
    def __init__(self, input_dim: int = 5, hidden: int = 4, num_classes: int = 3, lr: float = 0.3, optimizer: str = "sgd", blow_up_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
        self.lr = lr
        self.optimizer = optimizer
        self.blow_up_at_step = blow_up_at_step

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(self(batch["input"]), batch["target"], reduction="none")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch).mean()
        if self.blow_up_at_step is not None and self.global_step == self.blow_up_at_step:
            loss = loss * float("inf")  # AMP's scaler must skip this step
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@dataclass
class TinyData:
    train: TensorDataset
    val: TensorDataset

    @staticmethod
    def make(num_train: int, num_val: int, seed: int, dtype: torch.dtype = torch.float64) -> "TinyData":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(num_train + num_val, 5, generator=g, dtype=dtype)
        w = torch.randn(5, 3, generator=g, dtype=dtype)
        y = (x @ w + 0.5 * torch.randn(num_train + num_val, 3, generator=g, dtype=dtype)).argmax(1)
        return TinyData(TensorDataset(x[:num_train], y[:num_train]), TensorDataset(x[num_train:], y[num_train:]))

    def loader(self, batch_size: int = 4, seed: int = 0) -> DataLoader:
        indexed = IndexedDataset(self.train)
        return DataLoader(indexed, batch_size=batch_size, sampler=EpochSeededSampler(len(indexed), seed=seed))


# The recorder the fidelity benchmark uses: theta_t, eta_t and ids of every optimizer step.
TrajectoryRecorder = harness.TrajectoryRecorder


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def captured_model(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Any, list[str], dict[str, Tensor], Any, list[Any]]:
    """``(loss, names, params, capture, micro_batches)`` for the engine's passes: the model's per-sample
    cross-entropy (unseeded), its parameters' names and detached copies, a capture on every
    parameter, and ``(inputs, labels)`` as one micro-batch."""
    from diffin_lightning.engine import MicroBatch, StepCapture
    from diffin_lightning.per_sample import PerSampleLoss

    loss = PerSampleLoss(model, lambda module, batch: F.cross_entropy(module(batch[0]), batch[1], reduction="none"), seed=None)
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return loss, names, params, StepCapture(model, names), [MicroBatch((inputs, labels), len(labels))]


# ---------------------------------------------------------------- brute-force references


def _loss(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    out = torch.func.functional_call(model, params, (x,))
    return F.cross_entropy(out, y, reduction="none")


def sample_gradients(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, create_graph: bool = False) -> list[Tensor]:
    """G_i as flat vectors, one autograd call per sample."""
    grads = []
    names = list(params)
    for i in range(len(y)):
        loss = _loss(model, params, x[i : i + 1], y[i : i + 1])[0]
        g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    return grads


def leaf_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def shifted(params: dict[str, Tensor], flat: Tensor, scale: float) -> dict[str, Tensor]:
    out, offset = {}, 0
    for n, p in params.items():
        out[n] = (p.detach() + scale * flat[offset : offset + p.numel()].view_as(p)).requires_grad_(True)
        offset += p.numel()
    return out


def mean_gradient(model, params, x, y) -> Tensor:
    return torch.stack(sample_gradients(model, params, x, y)).mean(0)


def exact_brackets(model, params, x, y, target_gradient: Tensor, samples: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """<g_V, H_B G_i + H_i G_B> for each sample i (of the batch, or of ``samples``), by double backward."""
    p = leaf_params(params)
    names = list(p)
    batch_gradient = torch.stack(sample_gradients(model, p, x, y, create_graph=True)).mean(0)
    grads = sample_gradients(model, p, *(samples or (x, y)), create_graph=True)
    out = []
    for g_i in grads:
        f_i = torch.dot(batch_gradient, g_i)  # gradient of f_i is H_B G_i + H_i G_B
        d = torch.autograd.grad(f_i, [p[n] for n in names], retain_graph=True)
        out.append(torch.dot(torch.cat([t.reshape(-1) for t in d]), target_gradient))
    return torch.stack(out)


def finite_difference_brackets(model, params, x, y, target_gradient: Tensor, eps: float, scheme: str = "forward", samples: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """|g| (f_i(theta + eps u) - f_i(theta)) / eps, every f_i from a per-sample loop (samples default: the batch)."""

    def f_at(point):
        batch_gradient = torch.stack(sample_gradients(model, point, x, y)).mean(0)
        return torch.stack(sample_gradients(model, point, *(samples or (x, y)))) @ batch_gradient

    norm = target_gradient.norm()
    u = target_gradient / norm
    plus = f_at(shifted(params, u, eps))
    if scheme == "forward":
        return norm * (plus - f_at(leaf_params(params))) / eps
    return norm * (plus - f_at(shifted(params, u, -eps))) / (2 * eps)


def compose_app_config(name: str, overrides: list[str]) -> Any:
    """The train or analyze app's config, composed by Hydra from the package's configs."""
    from hydra import compose, initialize_config_dir

    from diffin_lightning.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)
