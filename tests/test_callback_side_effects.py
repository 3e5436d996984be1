"""The callback observes training and never changes it: same parameters, same buffers, same random numbers.

The extra passes (target gradients, the finite difference, the end-of-fit drift pass, the
per-sample loss check) must leave BatchNorm running statistics and ``num_batches_tracked``
alone, and must not consume the random numbers training draws (dropout masks, data order).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


class BatchNormClassifier(TinyClassifier):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=affine), nn.Tanh(), nn.Linear(6, 3))


class DropoutClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 3))


MODELS = {
    "batchnorm": lambda: BatchNormClassifier(),
    # Without affine parameters every trainable parameter sits in a Linear: the ghost path, which the
    # 'self' target needs here (vmap cannot take per-sample gradients through BatchNorm's batch statistics).
    "batchnorm_no_affine": lambda: BatchNormClassifier(affine=False),
    "dropout": lambda: DropoutClassifier(),
}
TARGETS = {"dataset": lambda data: data.val, "train": lambda data: "train", "self": lambda data: "self"}


def _state_after_fit(tmp_path, model_name: str, data, targets: dict[str, Any] | None) -> dict[str, Tensor]:
    model = MODELS[model_name]().double()
    # BatchNorm mixes a batch's samples, so the callback refuses it unless told to accept approximate
    # scores; accepted, its extra passes must still leave training untouched.
    callbacks = [] if targets is None else [DiffInCallback(targets=targets, output_dir=tmp_path / "influence", allow_batch_mixing=True)]
    torch.manual_seed(123)  # the run's own randomness (dropout masks) starts from the same state either way
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=callbacks).fit(model, data.loader(batch_size=4))
    # state_dict holds the parameters and every buffer (running_mean, running_var, num_batches_tracked)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize(
    ("model_name", "target_kind"),
    [
        ("batchnorm", "dataset"),
        ("batchnorm", "train"),
        ("batchnorm_no_affine", "self"),
        ("dropout", "dataset"),
        ("dropout", "train"),
        ("dropout", "self"),
    ],
)
def test_parameters_and_buffers_bit_identical_with_and_without_the_callback(tmp_path, tiny_data, model_name, target_kind):
    without = _state_after_fit(tmp_path / "without", model_name, tiny_data, None)
    with_callback = _state_after_fit(tmp_path / "with", model_name, tiny_data, {"t": TARGETS[target_kind](tiny_data)})
    assert without.keys() == with_callback.keys()
    if model_name.startswith("batchnorm"):
        assert any("running_var" in name for name in without)  # the test looks at the buffers it means to
    for name in without:
        assert torch.equal(without[name], with_callback[name]), f"{name} differs with the callback"


@pytest.mark.parametrize("accumulate_grad_batches", [1, 2])
def test_extra_passes_use_the_training_steps_dropout_masks(tmp_path, tiny_data, accumulate_grad_batches):
    """The callback's gradients are those of the network the training step differentiated (its masks).

    With the 'train' target at decay 0, g_V is the callback's own batch gradient G_B, so after one
    step sum_i first_order_i = (eta/|B|) sum_i <G_B, G_i> = eta |G_B|^2, while the update training
    made is theta_1 - theta_0 = -eta G_B(training's masks). The two agree only if the callback's
    passes drew the training step's masks (a fresh draw gives another G_B).
    """
    model = DropoutClassifier().double()
    start = [p.detach().clone() for p in model.parameters()]
    callback = DiffInCallback(targets={"t": "train"}, train_target_decay=0.0, output_dir=tmp_path / "influence")
    torch.manual_seed(7)
    trainer(default_root_dir=tmp_path, max_steps=1, accumulate_grad_batches=accumulate_grad_batches, callbacks=[callback]).fit(
        model, tiny_data.loader(batch_size=4)
    )
    eta = model.lr
    update_squared = sum(float(((p.detach() - p0) ** 2).sum()) for p, p0 in zip(model.parameters(), start))
    recorded = callback.influence["t"]
    assert int(recorded.visits.sum()) == 4 * accumulate_grad_batches  # one step of all its micro-batches
    assert float(recorded.first_order.sum()) == pytest.approx(update_squared / eta, rel=1e-10)
