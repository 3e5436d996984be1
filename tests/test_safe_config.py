"""Untrusted run directories: analyze builds nothing whose _target_ lies outside the allow-list."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffin_lightning import InfluenceResult, TargetInfluence, save_influence
from diffin_lightning.analyze import analyze
from diffin_lightning.cli import CONFIG_DIR
from diffin_lightning.safe_config import ENVIRONMENT_VARIABLE, UntrustedTargetError, allowed_modules, check_config_targets

REPO = Path(__file__).resolve().parent.parent


def _hostile_configs(tmp_path):
    """Config nodes that run code when instantiated, each leaving a marker file when it does."""
    repo = tmp_path / "hub_repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'hub_marker')!r}).write_text('ran')\ndef model():\n    return None\n"
    )
    return {
        "os.system": ({"_target_": "os.system", "_args_": [f"touch {tmp_path / 'system_marker'}"]}, tmp_path / "system_marker"),
        "torch.hub.load": (
            {"_target_": "torch.hub.load", "repo_or_dir": str(repo), "model": "model", "source": "local", "trust_repo": True},
            tmp_path / "hub_marker",
        ),
        # Starts inside the package, walks out through an attribute: refused by where the object is defined.
        "escape": ({"_target_": "diffin_lightning.callback.os.system", "_args_": [f"touch {tmp_path / 'escape_marker'}"]}, tmp_path / "escape_marker"),
    }


def _run_dir(tmp_path, data_node):
    run_dir = tmp_path / "run"
    first = torch.zeros(4, dtype=torch.float64)
    save_influence(InfluenceResult({"self": TargetInfluence("self", "self", first, first, first, first)}, {"num_samples": 4}), run_dir)
    config = OmegaConf.create({"seed": 0, "data": data_node, "model": {"_target_": "diffin_lightning.bundled.MLPClassifier"}})
    OmegaConf.save(config, run_dir / "config.yaml")
    return run_dir


def _analyze_config(run_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="analyze", overrides=["task=clean", f"run_dir={run_dir}", *overrides])


@pytest.mark.parametrize("name", ["os.system", "torch.hub.load", "escape"])
def test_hostile_targets_are_refused_before_anything_runs(tmp_path, name, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    node, marker = _hostile_configs(tmp_path)[name]
    # Instantiating the node as the analysis would runs its code, unless the installed Hydra's own
    # blocklist (best effort, version-dependent) happens to name it; the library must not rely on that.
    try:
        instantiate(OmegaConf.create(node))
        assert marker.exists()
        marker.unlink()
    except InstantiationException:
        assert not marker.exists()

    run_dir = _run_dir(tmp_path, node)
    with pytest.raises(UntrustedTargetError, match=r"data\._target_ is .*outside the allowed modules.*allowed_targets=\[.*DIFFIN_ALLOWED_TARGETS="):
        analyze(_analyze_config(run_dir), tmp_path / "out")
    assert not marker.exists(), "the hostile target ran"


def test_a_module_outside_the_list_is_not_even_imported(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "sneaky_module_xyz.py").write_text(f"open({str(tmp_path / 'import_marker')!r}, 'w').write('imported')\nclass Data: pass\n")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    with pytest.raises(UntrustedTargetError, match="would import 'sneaky_module_xyz'"):
        check_config_targets({"trainer": {"callbacks": [{"_target_": "sneaky_module_xyz.Data"}]}}, source="config.yaml")
    assert not (tmp_path / "import_marker").exists()
    assert "sneaky_module_xyz" not in sys.modules
    # Allowed in the environment, it resolves (and is imported).
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "other_pkg, sneaky_module_xyz")
    check_config_targets({"trainer": {"callbacks": [{"_target_": "sneaky_module_xyz.Data"}]}}, source="config.yaml")
    assert (tmp_path / "import_marker").exists()
    sys.modules.pop("sneaky_module_xyz", None)


def test_the_bundled_configs_pass_and_more_can_be_allowed(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for experiment in ("tiny", "digits_noisy"):
            check_config_targets(compose(config_name="train", overrides=[f"experiment={experiment}"]), source=experiment)
        check_config_targets(compose(config_name="train", overrides=["trainer=ddp", "model=cnn"]), source="ddp")
    node = {"_target_": "collections.OrderedDict"}
    with pytest.raises(UntrustedTargetError, match="'collections'"):
        check_config_targets(node, source="x")
    check_config_targets(node, source="x", allowed=["collections"])
    assert allowed_modules("a.b,c") [-2:] == ("a.b", "c")
    with pytest.raises(UntrustedTargetError, match="not a dotted path"):
        check_config_targets({"_target_": "os.system; rm"}, source="x")


@pytest.mark.parametrize("name, allow", [("torch.hub.load", "allowed_targets=[torch.hub]")])
def test_cli_refuses_in_one_line_and_allowed_targets_lets_it_through(tmp_path, name, allow):
    node, marker = _hostile_configs(tmp_path)[name]
    run_dir = _run_dir(tmp_path, node)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    env.pop(ENVIRONMENT_VARIABLE, None)
    command = [sys.executable, "-m", "diffin_lightning.analyze", "task=clean", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'out'}"]
    refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"data._target_ is {name!r}" in errors[0] and allow in errors[0], refused.stderr
    assert not marker.exists()
    # The user who trusts the directory says so, and the target is built (it runs, then the task fails on its
    # output); in-process, the same app function the command line calls.
    with pytest.raises(Exception) as raised:
        analyze(_analyze_config(run_dir, allow), tmp_path / "out_allowed")
    assert not isinstance(raised.value, UntrustedTargetError) and marker.exists()
