"""Replay: influence on a target chosen after training, from the run's trajectory log.

``diffin-analyze task=replay run_dir=... target=test`` (or ``target=val``, or ``"target=[3,17,42]"``
for chosen test points) runs :func:`diffin_lightning.trajectory_influence` on the run's
``trajectory/`` log and stores the scores in ``<run_dir>/replay/`` (``influence.safetensors`` +
``influence.json``, ``schedule="replay"``; a later replay of another target is added beside the
earlier ones). ``task=clean|delete|coreset score=replay`` then read them like any other scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from diffin_lightning.errors import UsageError
from diffin_lightning.replay import HVP_MODES, trajectory_influence
from diffin_lightning.store import InfluenceFileError, InfluenceResult, has_result, load_influence, save_influence
from diffin_lightning.tasks.report import format_table, write_json
from diffin_lightning.tasks.run import TrainedRun
from diffin_lightning.trajectory import INDEX_FILE, TrajectoryLogError

TRAJECTORY_DIR = "trajectory"  # where the train app's TrajectoryLog writes, inside the run directory
REPLAY_DIR = "replay"  # where task=replay stores its scores, inside the run directory


def _target(run: TrainedRun, target: Any) -> tuple[str, Any]:
    """(name, data) of the replay target: a split name or a list of test ids."""
    datamodule = run.datamodule
    if target is None:
        target = "test" if getattr(datamodule, "test_dataset", None) is not None else "val"
    if isinstance(target, str):
        split = {"val": "val_dataset", "test": "test_dataset"}.get(target)
        if split is None or getattr(datamodule, split, None) is None:
            raise UsageError(f"target must be val, test or a list of test ids (e.g. \"target=[3,17]\"); got {target!r}.")
        return target, getattr(datamodule, split)
    if isinstance(target, Sequence) and target and all(isinstance(i, int) and not isinstance(i, bool) for i in target):
        test = datamodule.test_dataset
        bad = [i for i in target if not 0 <= i < len(test)]
        if bad:
            raise UsageError(f"target: test ids must be in [0, {len(test)}); got {bad}.")
        ids = sorted(set(target))
        return "test_" + "_".join(str(i) for i in ids), Subset(test, ids)
    raise UsageError(f"target must be val, test or a non-empty list of test ids (e.g. \"target=[3,17]\"); got {target!r}.")


def replay(run: TrainedRun, out_dir: Path, target: Any = None, hvp: str = "central", show: int = 10, progress: bool = True) -> dict[str, Any]:
    """Replay the run for ``target``; store the scores in ``<run_dir>/replay/`` and summarise them in ``out_dir``."""
    if hvp not in HVP_MODES:
        raise UsageError(f"hvp must be one of {', '.join(HVP_MODES)}; got {hvp!r}.")
    log_dir = run.directory / TRAJECTORY_DIR
    if not (log_dir / INDEX_FILE).is_file():
        raise UsageError(
            f"run_dir {run.directory} has no trajectory log ({TRAJECTORY_DIR}/{INDEX_FILE}); train with "
            "trajectory.enabled=true (the default) to be able to replay."
        )
    name, data = _target(run, target)
    model = run.model
    try:
        result = trajectory_influence(model, log_dir, run.datamodule.train_dataset, {name: data}, hvp=hvp, progress=progress)  # type: ignore[arg-type]
    except TrajectoryLogError as error:
        raise UsageError(str(error)) from error
    store = run.directory / REPLAY_DIR
    merged = _merge(store, result, run)
    save_influence(merged, store)
    scores = result[name].diffin
    order = torch.argsort(scores)
    rows = [[rank, int(i), float(scores[i])] for rank, i in enumerate(order[:show].tolist(), start=1)]
    print(f"Replayed {result.metadata['steps_recorded']} steps for target {name!r} in {result.metadata['seconds']:.1f} s "
          f"(max replay drift {result.metadata['replay_drift_max']:.2g}); scores in {store}")
    print(f"Most harmful for {name} (lowest influence; removing them would lower its loss):")
    print(format_table(["rank", "id", "influence"], rows))
    summary = {
        "target": name,
        "scores": str(store),
        "steps": result.metadata["steps_recorded"],
        "seconds": result.metadata["seconds"],
        "replay_drift_max": result.metadata["replay_drift_max"],
        "most_harmful": [int(i) for i in order[:show]],
        "most_helpful": [int(i) for i in order.flip(0)[:show]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "replay.json", summary)
    return summary


def _merge(store: Path, result: InfluenceResult, run: TrainedRun) -> InfluenceResult:
    """Earlier replayed targets of the same run kept beside the new one (same data, same log)."""
    if not has_result(store):
        return result
    try:
        earlier = load_influence(store, dataset=run.datamodule.train_dataset)
    except InfluenceFileError:
        return result  # unreadable or other data: the new result replaces it
    if earlier.metadata.get("log_run_id") != result.metadata.get("log_run_id"):
        return result
    targets = {**earlier.targets, **result.targets}
    return InfluenceResult(targets=targets, metadata={**result.metadata, "targets": list(targets)})


def with_replay_scores(run: TrainedRun) -> TrainedRun:
    """The run with its replayed scores in place of the in-run ones (``score=replay`` reads ``diffin`` of these)."""
    store = run.directory / REPLAY_DIR
    if not has_result(store):
        raise UsageError(
            f"score=replay: {store} holds no replayed scores yet; run `diffin-analyze task=replay run_dir={run.directory} "
            "target=test` first."
        )
    return dataclasses.replace(run, influence=load_influence(store, dataset=run.datamodule.train_dataset))
