"""The train app records the trajectory log; `task=replay` replays it; `score=replay` feeds the other tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffin_lightning import IndexedDataset, load_influence, trajectory_influence
from diffin_lightning.analyze import analyze
from diffin_lightning.errors import UsageError
from diffin_lightning.tasks.run import load_run
from diffin_lightning.train import train
from helpers import compose_app_config




def test_replay_task_stores_scores_that_the_other_tasks_read(tiny_run, tmp_path, capsys):
    index = json.loads((tiny_run / "trajectory" / "trajectory.json").read_text())
    assert index["complete"] and index["final_step"] == 24  # 128 samples, batch 16, 3 epochs

    summary = analyze(compose_app_config("analyze", ["task=replay", f"run_dir={tiny_run}", "target=test"]), tmp_path / "a")
    assert summary["target"] == "test" and "Most harmful for test" in capsys.readouterr().out
    analyze(compose_app_config("analyze", ["task=replay", f"run_dir={tiny_run}", "target=[4,1]"]), tmp_path / "b")
    run = load_run(tiny_run)
    stored = load_influence(tiny_run / "replay", dataset=run.datamodule.train_dataset)
    assert set(stored) == {"test", "test_1_4"} and stored.metadata["schedule"] == "replay"
    assert torch.equal(stored["test"].visits, torch.full((128,), 3.0, dtype=torch.float64))
    # The stored scores are trajectory_influence's on the same log and model.
    direct = trajectory_influence(run.model, tiny_run / "trajectory", run.datamodule.train_dataset, {"test": run.datamodule.test_dataset}, progress=False)
    assert torch.equal(direct["test"].diffin, stored["test"].diffin)

    clean = analyze(compose_app_config("analyze", ["task=clean", f"run_dir={tiny_run}", "score=replay", "target=test"]), tmp_path / "c")
    suspects = (tmp_path / "c" / "suspects.csv").read_text().splitlines()
    most_harmful = int(torch.argmin(stored["test"].diffin))
    assert int(suspects[1].split(",")[1]) == most_harmful and 0 <= clean["auroc"] <= 1
    deletion = analyze(compose_app_config("analyze", ["task=delete", f"run_dir={tiny_run}", "score=replay", "target=test", "k=[3]"]), tmp_path / "d")
    worst = torch.argsort(stored["test"].diffin)[:3]
    assert deletion["deletions"][0]["predicted_change"] == pytest.approx(float(stored["test"].diffin[worst].sum()))


def test_replay_task_errors(tiny_run, tmp_path):
    with pytest.raises(UsageError, match="target must be val, test or a list of test ids"):
        analyze(compose_app_config("analyze", ["task=replay", f"run_dir={tiny_run}", "target=self"]), tmp_path)
    with pytest.raises(UsageError, match=r"test ids must be in \[0, "):
        analyze(compose_app_config("analyze", ["task=replay", f"run_dir={tiny_run}", "target=[100000]"]), tmp_path)


def test_runs_without_a_log_or_replayed_scores_say_what_to_do(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_app_config("train", ["experiment=tiny", "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "trajectory.enabled=false"]), run_dir)
    assert not (run_dir / "trajectory").exists()
    with pytest.raises(UsageError, match="has no trajectory log"):
        analyze(compose_app_config("analyze", ["task=replay", f"run_dir={run_dir}"]), tmp_path / "a")
    with pytest.raises(UsageError, match="holds no replayed scores yet; run `diffin-analyze task=replay"):
        analyze(compose_app_config("analyze", ["task=clean", f"run_dir={run_dir}", "score=replay"]), tmp_path / "b")
    assert isinstance(load_run(run_dir).datamodule.train_dataset, IndexedDataset)
