"""Layering: the post-hoc tasks import no CLI module, and the callback keeps only Lightning's hooks and hands off.

``diffin_lightning.cli`` is what the Hydra apps share (config directory, one-line errors) and
``diffin_lightning.train`` / ``diffin_lightning.analyze`` are the apps; the tasks in
``diffin_lightning.tasks`` (and the non-CLI modules they build on) must be importable without
any of them. The modules are imported in a fresh interpreter, so nothing imported by another
test or by pytest itself hides a violation. (Hydra itself is allowed: the tasks rebuild a run's
objects from its config with ``hydra.utils.instantiate``.)

The callback's other logic lives in modules of one idea each (README.md's "Code layout"); the
second half keeps it out, so that a check, a plan or a reading of Lightning's state added back
as a method fails here.
"""

from __future__ import annotations

import inspect
import json
import linecache
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

import diffin_lightning.tasks
from diffin_lightning import DiffInCallback

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


# ---------------------------------------------------------------------- the callback

# The public results API and Lightning's checkpoint-state protocol, besides the hooks.
_PUBLIC_API = {"state_dict", "load_state_dict", "state_key", "check_strategy", "influence", "influence_with"}

# A private method is thin glue (state the hooks share, a write, the ranks' totals) when it fits in this many
# source lines, its def and docstring included. The longest glue today (_write) has 18; before the split eight
# private methods had more (the optimizer checks 26, the training step's gradients 32, the resume's adoption 27,
# the sample ids' checks 22, ...). Shorter ones moved too (the per-sample loss check, AMP's skip): for their idea.
_GLUE_LINES = 20


def _methods(cls: type) -> dict[str, object]:
    """Every function defined in ``cls``'s own body (properties as their getter, static and class methods unwrapped)."""
    out = {}
    for name, value in vars(cls).items():
        if isinstance(value, property):
            out[name] = value
        elif isinstance(value, (staticmethod, classmethod)):
            out[name] = value.__func__
        elif inspect.isfunction(value):
            out[name] = value
    return out


def _misplaced(cls: type) -> list[str]:
    hooks = set(dir(pl.Callback))
    problems = []
    for name, value in _methods(cls).items():
        if isinstance(value, property) or name in hooks or name in _PUBLIC_API:
            continue
        if not name.startswith("_"):
            problems.append(f"{name}: public, but neither a Lightning hook, a property nor the results API")
            continue
        lines = len(inspect.getsourcelines(value)[0])
        if lines > _GLUE_LINES:
            problems.append(f"{name}: a private helper of {lines} lines (> {_GLUE_LINES}); move it to a module of its own idea")
    return problems


def test_the_callback_holds_hooks_properties_the_results_api_and_thin_glue_only():
    assert _misplaced(DiffInCallback) == []


def test_the_layering_check_fails_on_a_big_helper_or_a_public_method_added_back():
    # The check itself must be able to fail: a subclass given a private helper one line over the limit, and a public one.
    source = "def _check_optimizer(self, trainer):\n" + "".join(f"    x{i} = {i}\n" for i in range(_GLUE_LINES))
    namespace: dict[str, object] = {}
    exec(compile(source, "<helper>", "exec"), namespace)
    # inspect reads a function's source through linecache: give it the generated one's.
    linecache.cache["<helper>"] = (len(source), None, source.splitlines(True), "<helper>")
    try:
        grown = type("Grown", (DiffInCallback,), {"_check_optimizer": namespace["_check_optimizer"], "plan_checkpoints": lambda self: None})
        problems = _misplaced(grown)
    finally:
        linecache.cache.pop("<helper>", None)
    assert any(p.startswith("_check_optimizer: a private helper of 21 lines") for p in problems), problems
    assert any(p.startswith("plan_checkpoints: public") for p in problems), problems
    assert len(problems) == 2, problems
