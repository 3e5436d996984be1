"""Hydra app: train any LightningModule on any LightningDataModule with the Diff-In callback.

    python -m diffin_lightning.train data=digits data.label_noise=0.1 trainer.max_epochs=20 seed=3

Each run writes into its own directory (printed at the end): ``config.yaml`` (the
resolved config), ``checkpoints/``, ``influence.safetensors`` + ``influence.json``,
``dynamics.safetensors`` (EL2N and forgetting baselines) and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from diffin_lightning.callback import DiffInCallback
from diffin_lightning.builders import build_datamodule, build_model
from diffin_lightning.cli import CONFIG_DIR, built, one_line_errors, resolved_yaml
from diffin_lightning.errors import UsageError
from diffin_lightning.dynamics import TrainingDynamicsCallback
from diffin_lightning.store import atomic_write_bytes
from diffin_lightning.trajectory import TrajectoryLog

SPLIT_TARGETS = {"val": "val_dataset", "test": "test_dataset"}


def resolve_targets(names: Any, datamodule: Any) -> dict[str, Any]:
    """Map the config's target names to what DiffInCallback takes."""
    if isinstance(names, str):
        names = [names]
    resolved: dict[str, Any] = {}
    for name in names:
        if name in ("train", "self"):
            resolved[name] = name
        elif name in SPLIT_TARGETS:
            if not hasattr(datamodule, SPLIT_TARGETS[name]):
                raise UsageError(
                    f"influence.targets names {name!r}, but {type(datamodule).__name__} has no attribute "
                    f"`{SPLIT_TARGETS[name]}`; give the data module that split or drop the target."
                )
            resolved[name] = getattr(datamodule, SPLIT_TARGETS[name])
        else:
            raise UsageError(f"influence.targets must name val, test, train or self; got {name!r}.")
    return resolved


def build_influence_callback(config: DictConfig, datamodule: Any, run_dir: Path) -> DiffInCallback:
    options = OmegaConf.to_container(config, resolve=True)
    assert isinstance(options, dict)
    options.pop("_target_", None)
    targets = resolve_targets(options.pop("targets"), datamodule)
    try:
        return DiffInCallback(targets=targets, output_dir=run_dir, **options)
    except (TypeError, ValueError) as error:
        raise UsageError(f"influence: {error}") from error


def train(config: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir``; returns the run's summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", resolved_yaml(config).encode())
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = built("data", config.data, lambda: build_datamodule(config.data))
    model = built("model", config.model, lambda: build_model(config.model, datamodule))
    influence = build_influence_callback(config.influence, datamodule, run_dir)
    dynamics = TrainingDynamicsCallback(el2n_epoch=config.dynamics.el2n_epoch, output_dir=run_dir)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)
    trajectory = OmegaConf.select(config, "trajectory", default=None)
    extra = []
    if trajectory is not None and trajectory.enabled:
        # task=replay reads <run_dir>/trajectory (diffin_lightning.tasks.replay.TRAJECTORY_DIR).
        extra.append(TrajectoryLog(output_dir=run_dir / "trajectory", checkpoint_every_n_steps=trajectory.checkpoint_every_n_steps))
    trainer = built(
        "trainer",
        config.trainer,
        lambda: instantiate(
            config.trainer,
            default_root_dir=str(run_dir),
            callbacks=[influence, dynamics, checkpoints, *extra],
            logger=CSVLogger(str(run_dir), name="logs"),
        ),
    )
    logs = [callback for callback in trainer.callbacks if isinstance(callback, TrajectoryLog)]
    if logs and trainer.world_size > 1:
        # The trajectory log records one process's steps; under DDP the influence callback still runs.
        for log in logs:
            trainer.callbacks.remove(log)
        rank_zero_warn(
            f"trajectory: the trajectory log (task=replay) records single-device runs only; with world_size="
            f"{trainer.world_size} it is left out of this run (trajectory.enabled=false silences this)."
        )
    try:
        # Before fit: a multi-process strategy would launch its workers first and fail in each of them.
        DiffInCallback.check_strategy(trainer)
    except RuntimeError as error:
        raise UsageError(f"trainer: {error} (e.g. trainer=cpu, trainer=gpu or trainer=ddp)") from error
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=config.ckpt_path)
    last_checkpoint = run_dir / "checkpoints" / "last.ckpt"
    summary = {
        "run_dir": str(run_dir),
        "fit_seconds": round(time.perf_counter() - started, 3),
        "global_step": trainer.global_step,
        # JSON null, never the string "None", for a file that was not written
        "influence": _existing(influence.output_path),
        "dynamics": _existing(dynamics.output_path),
        "last_checkpoint": _existing(last_checkpoint),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if not trainer.is_global_zero:
        return summary  # under DDP every rank runs this function; rank zero writes (and checks) what it wrote
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if summary["influence"] is None:
        raise UsageError(
            f"the run made {trainer.global_step} optimizer steps and recorded no influence (trainer.max_epochs="
            f"{config.trainer.get('max_epochs')}, trainer.max_steps={config.trainer.get('max_steps', -1)}), so "
            f"{run_dir} holds no influence files for analyze. Train for at least one step, e.g. trainer.max_epochs=1."
        )
    return summary


def _existing(path: Path | None) -> str | None:
    return str(path) if path is not None and Path(path).exists() else None


@one_line_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(config: DictConfig) -> None:
    summary = train(config, Path(HydraConfig.get().runtime.output_dir))
    if rank_zero_only.rank == 0:
        print(f"run written to {summary['run_dir']} (influence: {summary['influence']})")


if __name__ == "__main__":
    main()
