"""Small classifiers with the per-sample loss the callback asks for."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLPClassifier(pl.LightningModule):
    """A multilayer perceptron trained with plain SGD on ``{"input", "target"}`` batches.

    Args:
        input_dim: features per sample.
        hidden_dims: widths of the hidden layers (tanh; smooth, so finite differences behave).
        num_classes: output classes.
        lr: SGD learning rate.
        momentum: SGD momentum (0 keeps the maths exact).
    """

    def __init__(self, input_dim: int = 64, hidden_dims: tuple[int, ...] = (32,), num_classes: int = 10, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def per_sample_loss(self, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(self(batch["input"]), batch["target"], reduction="none")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
