"""Every config composes with real Hydra and every object it names instantiates."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffin_lightning import DiffInCallback
from diffin_lightning.builders import build_datamodule, build_model
from diffin_lightning.cli import CONFIG_DIR
from diffin_lightning.train import build_influence_callback

GROUPS = {group: sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")) for group in ("data", "model", "trainer", "influence", "experiment")}


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if option == "cnn":
        overrides.append("data.image=true")
    if option == "gpu" and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")  # the real GPU instantiation is test_gpu_trainer_config
    config = _compose(overrides)
    datamodule = build_datamodule(config.data)
    model = build_model(config.model, datamodule)
    assert isinstance(model, pl.LightningModule)
    trainer = instantiate(config.trainer, default_root_dir=str(tmp_path), logger=False)
    assert isinstance(trainer, pl.Trainer)
    callback = build_influence_callback(config.influence, datamodule, tmp_path)
    assert isinstance(callback, DiffInCallback)
    batch = next(iter(datamodule.train_dataloader()))
    assert model.per_sample_loss(batch).shape == (len(batch["index"]),)


def test_presets_set_what_they_say():
    assert _compose(["influence=first_order"]).influence.compute_second_order is False
    assert _compose(["influence=every_10"]).influence.every_n_steps == 10
    noisy = _compose(["experiment=digits_noisy"])
    assert noisy.data.label_noise == 0.1


def test_analyze_config_composes():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(config_name="analyze", overrides=["task=coreset", "run_dir=/tmp/x", "p=[0.2]"])
    assert config.task == "coreset" and list(config.p) == [0.2]


@pytest.mark.gpu
def test_gpu_trainer_config(tmp_path):
    trainer = instantiate(_compose(["trainer=gpu"]).trainer, default_root_dir=str(tmp_path), logger=False)
    assert trainer.strategy.root_device.type == "cuda"
