"""Every user mistake, through the real console scripts: one `error:` line naming argument, rule, value and fix; exit 2.

HYDRA_FULL_ERROR=1 still gives the full traceback, and a failed analyze leaves no directory behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffin_lightning.cli import CONFIG_DIR
from diffin_lightning.train import train

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sys.executable).parent


def _script(name: str, *args: str, cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([str(SCRIPTS / name), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Error executing job" not in result.stderr


TRAIN_MISTAKES = [
    # (overrides, what the one line must say: argument/value, rule, fix)
    (["model=mpl"], ["model=mpl", "has no option 'mpl'", "Did you mean model=mlp?"]),
    (["trainer.max_epoch=1"], ["trainer.max_epoch=1", "no key", "Did you mean trainer.max_epochs=1?", "+trainer.max_epoch=1"]),
    (["data.label_noise=2"], ["data (", "`label_noise` must be in [0, 1); got 2"]),
    (["model=cnn"], ["model (", "must be [C, H, W]", "data=digits data.image=true"]),
    (["trainer.max_epochs=0"], ["recorded no influence", "trainer.max_epochs=0", "trainer.max_epochs=1"]),
]
if not torch.cuda.is_available():
    TRAIN_MISTAKES.append((["trainer=gpu"], ["trainer (", "no CUDA GPU", "trainer=cpu"]))


@pytest.mark.parametrize(("overrides", "fragments"), TRAIN_MISTAKES, ids=[" ".join(o) for o, _ in TRAIN_MISTAKES])
def test_train_mistakes_give_one_line(tmp_path, overrides, fragments):
    run_dir = tmp_path / "run"
    result = _script("diffin-train", "experiment=tiny", "trainer.enable_progress_bar=false", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _assert_one_error_line(result, *fragments)
    if overrides == ["trainer.max_epochs=0"]:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["influence"] is None and summary["last_checkpoint"] is None  # JSON null, not "None"
        assert "None" not in (run_dir / "summary.json").read_text()


@pytest.mark.parametrize("overrides", [["data.label_noise=2"]])
def test_hydra_full_error_still_shows_the_traceback(tmp_path, overrides):
    result = _script("diffin-train", "experiment=tiny", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, full_error=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(config_name="train", overrides=["experiment=tiny", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"])
    train(config, run_dir)
    return run_dir


ANALYZE_MISTAKES = [
    (["target=test"], ["target=test", "recorded no target 'test'", "self, train, val", "target=self"]),
    (["show=-1"], ["show", "positive integer", "-1", "show=20"]),
    (["task=fix"], ["task must be one of", "task=clean"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), ANALYZE_MISTAKES, ids=[" ".join(o) for o, _ in ANALYZE_MISTAKES])
def test_analyze_mistakes_give_one_line_and_leave_no_directory(tmp_path, one_epoch_run, overrides, fragments):
    out_dir = tmp_path / "analysis"
    result = _script("diffin-analyze", f"run_dir={one_epoch_run}", *overrides, f"hydra.run.dir={out_dir}", cwd=tmp_path)
    _assert_one_error_line(result, *fragments)
    assert not out_dir.exists()


def test_analyze_help_lists_analyze_keys_not_train_groups(tmp_path):
    result = _script("diffin-analyze", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "run_dir" in result.stdout and "show" in result.stdout
    assert "influence:" not in result.stdout and "model:" not in result.stdout and "Configuration groups" not in result.stdout
