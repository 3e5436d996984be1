"""Models whose layers mix the samples of a batch are refused at setup, whatever the targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffin_lightning import DiffInCallback
from diffin_lightning.batch_mixing import batch_mixing_modules
from helpers import TinyClassifier, trainer


class NormClassifier(TinyClassifier):
    def __init__(self, norm: str) -> None:
        super().__init__()
        torch.manual_seed(2)
        layer = {
            "batch": lambda: nn.BatchNorm1d(6),
            "batch_no_stats": lambda: nn.BatchNorm1d(6, track_running_stats=False),
            "group": lambda: nn.GroupNorm(2, 6),
            "layer": lambda: nn.LayerNorm(6),
        }[norm]()
        self.net = nn.Sequential(nn.Linear(5, 6), layer, nn.Tanh(), nn.Linear(6, 3))


def _targets(tiny_data, kind):
    return {"self": {"self": "self"}, "val": {"val": tiny_data.val}, "train": {"train": "train"}}[kind]


@pytest.mark.parametrize("kind", ["self", "val", "train"])
def test_batch_norm_is_refused_at_setup_whatever_the_targets(tmp_path, tiny_data, kind):
    model = NormClassifier("batch").double()
    before = [p.detach().clone() for p in model.parameters()]
    run = trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[DiffInCallback(targets=_targets(tiny_data, kind))])
    with pytest.raises(RuntimeError, match=r"net\.1 \(BatchNorm1d\).*GroupNorm or LayerNorm.*allow_batch_mixing=True"):
        run.fit(model, tiny_data.loader())
    assert run.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "training ran before the refusal"


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_per_sample_normalisation_runs(tmp_path, tiny_data, norm):
    callback = DiffInCallback(targets={"val": tiny_data.val, "self": "self"})
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(NormClassifier(norm).double(), tiny_data.loader())
    assert callback.steps_recorded == 4


def test_allow_batch_mixing_accepts_with_a_warning(tmp_path, tiny_data):
    callback = DiffInCallback(targets={"val": tiny_data.val}, allow_batch_mixing=True)
    with pytest.warns(UserWarning, match=r"net\.1 \(BatchNorm1d\).*Accepted \(allow_batch_mixing=True\)"):
        trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(NormClassifier("batch").double(), tiny_data.loader())
    assert callback.steps_recorded == 4 and torch.isfinite(callback.influence["val"].diffin).all()


def test_detection_rules():
    assert batch_mixing_modules(NormClassifier("batch").eval()) == [], "eval mode with running statistics is per sample"
    assert batch_mixing_modules(NormClassifier("batch_no_stats").eval()) == [("net.1", "BatchNorm1d")]
    assert batch_mixing_modules(NormClassifier("group")) == []

    class BatchCentering(nn.Module):
        mixes_samples = True  # a user's own layer declares itself

        def forward(self, x):
            return x - x.mean(0)

    assert batch_mixing_modules(nn.Sequential(nn.Linear(2, 2), BatchCentering())) == [("1", "BatchCentering")]
