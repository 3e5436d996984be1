"""Hydra app: turn a train run's influence files into decisions about the data.

    python -m diffin_lightning.analyze task=clean run_dir=runs/train/<run>
    python -m diffin_lightning.analyze task=delete run_dir=... k=[10,30,60] verify=true
    python -m diffin_lightning.analyze task=coreset run_dir=... p=[0.1,0.3,0.5] verify=true
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffin_lightning.cli import CONFIG_DIR, one_line_errors
from diffin_lightning.errors import UsageError
from diffin_lightning.tasks import clean, coreset, delete, load_run
from diffin_lightning.tasks import replay as replay_task

TASKS = ("clean", "delete", "coreset", "replay")


def _as_list(value: Any, name: str) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        return list(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise UsageError(f"{name} must be a number or a list of numbers; got {value!r}.")


def analyze(config: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run ``config.task`` on ``config.run_dir``, writing into ``out_dir``."""
    if config.task not in TASKS:
        raise UsageError(f"task must be one of {', '.join(TASKS)}; got {config.task!r}. Example: task=clean")
    show = config.get("show", 20)
    if isinstance(show, bool) or not isinstance(show, int) or show < 1:
        raise UsageError(f"show (how many suspects clean prints) must be a positive integer; got {show!r}. Example: show=20")
    run = load_run(OmegaConf.select(config, "run_dir", throw_on_missing=False), allowed_targets=config.get("allowed_targets"))
    print(f"Analysing {run.directory} -> {out_dir}")
    if config.task == "replay":
        target = OmegaConf.select(config, "target")
        target = OmegaConf.to_container(target) if isinstance(target, ListConfig) else target
        return replay_task.replay(run, out_dir, target=target, hvp=OmegaConf.select(config, "hvp", default="central"))
    if config.score == "replay":  # the scores task=replay stored, read like any other
        run, config = replay_task.with_replay_scores(run), OmegaConf.merge(config, {"score": "diffin"})
    if config.target is not None and config.target not in run.influence:
        raise UsageError(
            f"target={config.target}: run_dir {run.directory} recorded no target {config.target!r}; it recorded "
            f"{', '.join(sorted(run.influence))}. Use one of those (e.g. target={sorted(run.influence)[0]}), or train "
            f"again with influence.targets including {config.target!r}."
        )
    if config.task == "clean":
        return clean(run, out_dir, target=config.target, score=config.score, show=config.show)
    if config.task == "delete":
        explicit = config.fraction is not None or config.ids is not None
        return delete(
            run,
            out_dir,
            target=config.target,
            score=config.score,
            k=None if explicit else _as_list(config.k, "k"),
            fractions=_as_list(config.fraction, "fraction"),
            ids=_as_list(config.ids, "ids"),
            verify=bool(config.verify),
        )
    return coreset(
        run,
        out_dir,
        target=config.target,
        score=config.score,
        fractions=_as_list(config.p, "p") or [],
        class_balanced=bool(config.class_balanced),
        verify=bool(config.verify),
        seeds=_as_list(config.seeds, "seeds") or [],
        baselines=list(config.baselines),
    )


@one_line_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analyze")
def main(config: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        analyze(config, out_dir)
    except BaseException:
        _remove_if_only_hydra_files(out_dir)
        raise


def _remove_if_only_hydra_files(out_dir: Path) -> None:
    """A failed analysis leaves no directory behind that holds nothing but Hydra's own bookkeeping."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if entry.name == ".hydra" or (entry.suffix == ".log" and entry.stat().st_size == 0):
            continue
        return  # something the task wrote: keep it for the user to look at
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
