"""Layering: the post-hoc tasks import no CLI module.

``diffin_lightning.cli`` is what the Hydra apps share (config directory, one-line errors) and
``diffin_lightning.train`` / ``diffin_lightning.analyze`` are the apps; the tasks in
``diffin_lightning.tasks`` (and the non-CLI modules they build on) must be importable without
any of them. The modules are imported in a fresh interpreter, so nothing imported by another
test or by pytest itself hides a violation. (Hydra itself is allowed: the tasks rebuild a run's
objects from its config with ``hydra.utils.instantiate``.)
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import diffin_lightning.tasks

REPO = Path(__file__).resolve().parent.parent
CLI_MODULES = ("diffin_lightning.cli", "diffin_lightning.train", "diffin_lightning.analyze")
TASK_MODULES = sorted(f"diffin_lightning.tasks.{info.name}" for info in pkgutil.iter_modules(diffin_lightning.tasks.__path__))
NON_CLI_MODULES = ("diffin_lightning.errors", "diffin_lightning.builders", "diffin_lightning.safe_config")


def test_every_task_is_listed():
    # A sanity check on the discovery above: a renamed package would make the test vacuous.
    assert {"clean", "coreset", "delete", "plots", "replay", "report", "retrain", "run"} <= {m.rsplit(".", 1)[1] for m in TASK_MODULES}


def test_no_task_imports_a_cli_module():
    """One fresh interpreter imports the modules one by one and checks after each: the first that pulls a CLI module in
    is named (each in its own interpreter took 148 s of the suite on 2 cores; this takes one interpreter's start)."""
    modules = ["diffin_lightning.tasks", *TASK_MODULES, *NON_CLI_MODULES]
    script = (
        "import importlib, json, sys\n"
        "report = []\n"
        f"for module in {modules!r}:\n"
        "    imported = importlib.import_module(module)\n"
        f"    report.append([module, imported.__file__, [name for name in {CLI_MODULES!r} if name in sys.modules]])\n"
        "print(json.dumps(report))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [module for module, _, _ in report] == modules
    for module, location, cli_loaded in report:
        assert Path(location).resolve().is_relative_to(REPO), location  # this source tree, not another copy
        assert cli_loaded == [], f"importing {module} imported {cli_loaded}; tasks must import no CLI module"
