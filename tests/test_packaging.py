"""A normal install works: the wheel carries the configs, and both apps run from outside the source tree.

Builds the wheel from a copy of this working tree, installs it (no dependencies) into a fresh
virtualenv that sees this environment's dependencies but not the source tree, and runs the real
console scripts from an unrelated directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_both_apps_run_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=IGNORED)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], tmp_path, env)
    (wheel,) = wheels.glob("diffin_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffin_lightning/configs/train.yaml" in names and "diffin_lightning/configs/experiment/tiny.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # Install into the empty venv first (pip sees nothing to replace), then let it see this
    # environment's dependencies through a .pth line (a path only: that directory's own .pth
    # files, such as an editable install of the source tree, are not processed).
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip())
    (site / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = _run([str(python), "-c", "import diffin_lightning; print(diffin_lightning.__file__)"], elsewhere, env).stdout.strip()
    assert Path(located).is_relative_to(site), located  # the installed copy, not the source tree

    run_dir = elsewhere / "run"
    train = _run(
        [str(venv / "bin" / "diffin-train"), "experiment=tiny", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
        elsewhere,
        env,
    )
    assert f"run written to {run_dir}" in train.stdout
    assert json.loads((run_dir / "influence.json").read_text())["steps_recorded"] > 0
    out_dir = elsewhere / "clean"
    _run([str(venv / "bin" / "diffin-analyze"), "task=clean", f"run_dir={run_dir}", f"hydra.run.dir={out_dir}"], elsewhere, env)
    assert (out_dir / "suspects.csv").is_file()
