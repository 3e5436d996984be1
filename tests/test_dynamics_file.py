"""dynamics.safetensors (EL2N, forgetting counts) is read checked: a bad file is refused with what and how to fix."""

from __future__ import annotations

import pytest

import torch
from safetensors.torch import save as save_safetensors_bytes

from diffin_lightning.dynamics import DYNAMICS_FILE, DynamicsFileError, TrainingDynamicsCallback, load_dynamics
from helpers import TinyClassifier, trainer


def _write(directory, tensors):
    (directory / DYNAMICS_FILE).write_bytes(save_safetensors_bytes(tensors))


def test_a_written_file_loads_as_recorded(tmp_path, tiny_data):
    callback = TrainingDynamicsCallback(output_dir=tmp_path, el2n_epoch=0)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    loaded = load_dynamics(tmp_path)
    for name, value in callback.scores().items():
        assert torch.equal(loaded[name], value)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"el2n": torch.ones(3)}, r"must hold the tensors \['el2n', 'forgetting'\]; holds \['el2n'\]"),
        ({"el2n": torch.ones(3, 1), "forgetting": torch.zeros(3, dtype=torch.float64)}, r"'el2n' must be 1-d, one value per sample; has shape \(3, 1\)"),
        ({"el2n": torch.ones(3), "forgetting": torch.zeros(4, dtype=torch.float64)}, "they hold 3 and 4"),
        ({"el2n": torch.tensor([1.0, float("nan")]), "forgetting": torch.zeros(2, dtype=torch.float64)}, "'el2n' must be finite floats; got 1 non-finite"),
        ({"el2n": torch.ones(2, dtype=torch.int64), "forgetting": torch.zeros(2, dtype=torch.float64)}, "'el2n' must be finite floats; got dtype torch.int64"),
        ({"el2n": torch.ones(2), "forgetting": torch.tensor([0.0, -1.0], dtype=torch.float64)}, "'forgetting' must be counts"),
        ({"el2n": torch.ones(2), "forgetting": torch.tensor([0.5, 1.0], dtype=torch.float64)}, "'forgetting' must be counts"),
    ],
    ids=["missing", "not-1d", "lengths", "nan", "int-el2n", "negative-count", "fractional-count"],
)
def test_a_file_that_is_not_the_callbacks_is_refused_naming_the_rule_and_the_fix(tmp_path, tensors, message):
    _write(tmp_path, tensors)
    with pytest.raises(DynamicsFileError, match=message) as caught:
        load_dynamics(tmp_path)
    assert str(tmp_path / DYNAMICS_FILE) in str(caught.value) and "Re-run the training with TrainingDynamicsCallback" in str(caught.value)


def test_a_truncated_file_is_refused_not_a_library_traceback(tmp_path):
    _write(tmp_path, {"el2n": torch.ones(8), "forgetting": torch.zeros(8, dtype=torch.float64)})
    path = tmp_path / DYNAMICS_FILE
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DynamicsFileError, match="not a readable safetensors file"):
        load_dynamics(tmp_path)
