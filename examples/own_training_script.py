"""Use DiffInCallback in your own Lightning script, without Hydra.

Run: .venv/bin/python examples/own_training_script.py

The contract: the LightningModule has ``per_sample_loss(batch) -> Tensor[B]`` (unreduced
losses), and the training batches carry sample ids (``IndexedDataset`` puts them under
``batch["index"]``). Everything else is ordinary Lightning.
"""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffin_lightning import DiffInCallback, IndexedDataset, load_influence


class DigitsMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def per_sample_loss(self, batch):  # the callback's contract: one loss per sample
        return F.cross_entropy(self.net(batch["input"]), batch["target"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    L.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[torch.randperm(len(y))[: len(y) // 10]] = True  # corrupt 10% of the labels
    y_noisy = torch.where(flipped, (y + torch.randint(1, 10, y.shape)) % 10, y)
    train = IndexedDataset(TensorDataset(x[:1400], y_noisy[:1400]))  # batches now carry "index"
    val = TensorDataset(x[1400:], y[1400:])

    callback = DiffInCallback(targets={"val": val, "self": "self"}, output_dir="runs/own_script")
    trainer = L.Trainer(max_epochs=30, callbacks=[callback], logger=False, enable_checkpointing=False)
    trainer.fit(DigitsMLP(), DataLoader(train, batch_size=64, shuffle=True))

    scores = load_influence(callback.output_path, dataset=train)
    suspects = torch.argsort(scores["self"].diffin, descending=True)[:20]  # highest self-influence first
    # Lowest (most negative) influence on the val loss first. To find wrong labels the self-influence
    # above is the sharper signal (README, "Fidelity"): the val ranking answers "what hurt validation".
    harmful = torch.argsort(scores["val"].diffin)[:20]
    print("20 highest self-influence samples:", suspects.tolist())
    print(f"  of which flipped: {int(flipped[:1400][suspects].sum())}/20")
    print("20 most harmful samples for the val loss:", harmful.tolist())
    print(f"  of which flipped: {int(flipped[:1400][harmful].sum())}/20")
    print(f"influence files: {callback.output_path}")


if __name__ == "__main__":
    main()
