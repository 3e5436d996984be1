"""End to end: the train app, then every analyze task, on a tiny config; bad overrides give one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffin_lightning import load_influence
from diffin_lightning.analyze import analyze
from diffin_lightning.errors import UsageError
from diffin_lightning.dynamics import load_dynamics
from diffin_lightning.train import train
from helpers import compose_app_config

REPO = Path(__file__).resolve().parent.parent




def test_train_writes_everything(tiny_run):
    for name in ("config.yaml", "influence.safetensors", "influence.json", "dynamics.safetensors", "summary.json", "checkpoints/last.ckpt"):
        assert (tiny_run / name).is_file(), name
    result = load_influence(tiny_run)
    assert set(result) == {"val", "self", "train"}
    for target in result.values():
        assert torch.isfinite(target.diffin).all() and target.visits.min() >= 1
    assert OmegaConf.load(tiny_run / "config.yaml").data.num_samples == 128
    metadata = json.loads((tiny_run / "influence.json").read_text())
    assert metadata["second_order_terms_available"] == [metadata["second_order"]]  # exactly what the file holds


def test_clean(tiny_run, tmp_path, capsys):
    summary = analyze(compose_app_config("analyze", ["task=clean", f"run_dir={tiny_run}"]), tmp_path)
    lines = (tmp_path / "suspects.csv").read_text().splitlines()
    assert lines[0] == "rank,id,score,label,original_label,prediction,corrupted" and len(lines) == 129
    for line in lines[1:]:  # a corrupted label differs from the original, a clean one equals it
        _, _, _, label, original, _, corrupted = line.split(",")
        assert (label != original) == (corrupted == "1")
    assert (tmp_path / "clean.png").stat().st_size > 1000
    assert 0 <= summary["auroc"] <= 1 and set(summary["recall"]) == {"5%", "10%", "20%"}
    assert "Recall of corrupted labels" in capsys.readouterr().out
    assert json.loads((tmp_path / "clean.json").read_text())["sign_convention"].startswith("influence(i) approximates")


def test_delete_verified(tiny_run, tmp_path, capsys):
    summary = analyze(compose_app_config("analyze", ["task=delete", f"run_dir={tiny_run}", "k=[3,6]", "verify=true"]), tmp_path)
    assert [d["k"] for d in summary["deletions"]] == [3, 6]
    for record in summary["deletions"]:
        assert {"actual_change", "random_change", "test_accuracy", "random_test_accuracy"} <= set(record)
    assert (tmp_path / "deletion.png").is_file() and (tmp_path / "deletion.csv").is_file()
    assert "actual dval_loss" in capsys.readouterr().out


def test_delete_explicit_ids_without_verification(tiny_run, tmp_path):
    summary = analyze(compose_app_config("analyze", ["task=delete", f"run_dir={tiny_run}", "ids=[5,1,5]"]), tmp_path)
    scores = load_influence(tiny_run)["val"].diffin
    assert summary["deletions"][0]["ids"] == [1, 5]
    assert summary["deletions"][0]["predicted_change"] == pytest.approx(float(scores[1] + scores[5]))


def test_coreset_verified_with_baselines(tiny_run, tmp_path, capsys):
    summary = analyze(compose_app_config("analyze", ["task=coreset", f"run_dir={tiny_run}", "p=[0.5]", "seeds=[0,1]", "verify=true", "class_balanced=true"]), tmp_path)
    kept = json.loads((tmp_path / "coreset_0.5.json").read_text())["ids"]
    assert 60 <= len(kept) <= 68
    assert set(summary["accuracy"]) == {"diffin:val/diffin", "random", "el2n", "forgetting", "all data"}
    assert all(len(v) == 2 for per in summary["accuracy"].values() for v in per.values())
    assert "mean" in capsys.readouterr().out and (tmp_path / "coreset.png").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=fix"], "task must be one of clean, delete, coreset"),
        (["task=coreset", "p=[1.5]"], "fraction must be in (0, 1]"),
        (["task=delete", "fraction=0"], "fraction must be in (0, 1]"),
        (["task=delete", "target=self"], "self-influence target"),
        (["task=clean", "score=tracin"], "score must be one of"),
    ],
)
def test_bad_analysis_arguments(tiny_run, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        analyze(compose_app_config("analyze", overrides + [f"run_dir={tiny_run}"]), tmp_path)


def _cli(module, *args, cwd):
    # PYTHONPATH names this tree: a relative "." would mean cwd, and another install of the package could answer.
    # Not the launch variables a DDP test in this process may have left (a child would reuse its port).
    launch = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    for name in ("influence.safetensors", "influence.json", "config.yaml"):
        (other / name).write_bytes((tiny_run / name).read_bytes())
    config = OmegaConf.load(other / "config.yaml")
    config.data.seed = 1  # the same recipe on other data: the fingerprint must not match
    OmegaConf.save(config, other / "config.yaml")
    cases = [
        (["task=fix", f"run_dir={tiny_run}"], "task must be one of"),
        (["task=clean", f"run_dir={empty}"], "has no influence.safetensors"),
        (["task=coreset", "p=0", f"run_dir={tiny_run}"], "fraction must be in (0, 1]"),
        (["task=clean", f"run_dir={other}"], "fingerprint"),
    ]
    for args, message in cases:
        result = _cli("diffin_lightning.analyze", *args, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_cli_with_the_ddp_trainer(tmp_path):
    """trainer=ddp: two CPU processes over gloo; rank zero writes one file set covering every sample."""
    run_dir = tmp_path / "run"
    result = _cli(
        "diffin_lightning.train", "experiment=tiny", "trainer=ddp", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1  # printed by rank zero only
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 12  # 128 samples, 16 per rank and step, 2 ranks, 3 epochs
    scores = load_influence(run_dir)
    assert set(scores) == {"val", "self", "train"}
    for target in scores.values():
        # each rank saw half of every epoch; the file holds every sample, visited once per epoch
        assert torch.equal(target.visits, torch.full((128,), 3.0, dtype=torch.float64))
        assert torch.isfinite(target.diffin).all()
    assert json.loads((run_dir / "influence.json").read_text())["world_size"] == 2
    dynamics = load_dynamics(run_dir)  # EL2N of every sample (each rank follows all ranks' visits)
    assert torch.isfinite(dynamics["el2n"]).all() and dynamics["forgetting"].shape == (128,)


def test_train_cli_with_overrides(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(
        "diffin_lightning.train",
        "experiment=tiny",
        "influence=every_10",
        "influence.every_n_steps=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.gradient_clip_val=0.01",
        "seed=3",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"run written to {run_dir}" in result.stdout
    metadata = json.loads((run_dir / "influence.json").read_text())
    assert metadata["every_n_steps"] == 2 and metadata["steps_recorded"] == 4
    assert metadata["clipped_steps"] == 4  # every recorded step clipped at 0.01
    assert OmegaConf.load(run_dir / "config.yaml").seed == 3
