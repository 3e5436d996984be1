"""DiffInSettings: one place for the options, their help, their checks and their metadata."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path

import pytest

from diffin_lightning import DiffInCallback
from diffin_lightning.settings import DiffInSettings


def test_every_option_has_help_text_and_a_json_value():
    settings = DiffInSettings(loss_fn=lambda m, b: None, output_dir=Path("/tmp/x"))
    for f in fields(DiffInSettings):
        assert len(f.metadata["help"]) > 20, f.name
    as_dict = settings.to_dict()
    json.dumps(as_dict)  # JSON-able: it goes into influence.json
    assert set(as_dict) == {f.name for f in fields(DiffInSettings)}
    assert as_dict["output_dir"] == "/tmp/x" and "lambda" in as_dict["loss_fn"]
    assert as_dict["second_order"] == "propagated"


def test_unknown_option_names_it_and_lists_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['every_n_step'\].*every_n_steps"):
        DiffInCallback(targets={"s": "self"}, every_n_step=3)


def test_the_callback_keeps_its_keyword_arguments_and_saves_the_settings(tmp_path, tiny_data):
    from helpers import TinyClassifier, trainer

    callback = DiffInCallback(targets={"val": tiny_data.val}, every_n_steps=2, eps=1e-6, target_refresh_every_n_steps=3)
    assert callback.every_n_steps == 2 and callback.settings.target_refresh_every_n_steps == 3
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    saved = json.loads((tmp_path / "influence.json").read_text())
    assert saved["settings"]["every_n_steps"] == 2 and saved["settings"]["eps"] == 1e-6
    assert saved["settings"]["target_refresh_every_n_steps"] == 3


def test_hydra_config_names_exactly_the_settings():
    """configs/influence/*.yaml may only use option names the settings know (no second list by hand)."""
    import yaml

    known = {f.name for f in fields(DiffInSettings)} | {"_target_", "targets", "defaults"}
    for path in (Path(__file__).parent.parent / "diffin_lightning" / "configs" / "influence").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert set(config) <= known, (path.name, set(config) - known)
    # The base config states the library's defaults (the app only turns on writing at checkpoints).
    base = yaml.safe_load((Path(__file__).parent.parent / "diffin_lightning" / "configs" / "influence" / "diffin.yaml").read_text())
    defaults = {**DiffInSettings.defaults(), "second_order": DiffInSettings().resolved_second_order}
    differing = {k for k, v in base.items() if k in defaults and v != defaults[k]}
    assert differing == {"save_on_checkpoint"}, differing


def test_defaults_are_documented_in_the_callback_docstring():
    assert "DiffInSettings" in inspect.getdoc(DiffInCallback)
    assert DiffInSettings.defaults()["target_refresh_every_n_steps"] == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_max_samples": 0}, "`target_max_samples` must be a positive int; got 0"),
        ({"reuse_training_step": "yes"}, "`reuse_training_step` must be True, False or None"),
        ({"dot_products": "ghost"}, "`dot_products` must be one of"),
        ({"loss_fn": 3}, "`loss_fn` must be callable or None; got int"),
        ({"schedule": "checkpoints", "num_checkpoints": 2, "every_n_steps": 2}, "`every_n_steps` must be 1 with schedule='checkpoints'"),
        ({"target_extrapolation": 1}, r"`target_extrapolation` must be one of \('none', 'linear', 'damped'\), True \('linear'\), False \('none'\) or None \(auto\); got 1"),
        ({"target_extrapolation": "quadratic"}, "`target_extrapolation` must be one of .*; got 'quadratic'. Example: target_extrapolation='damped'"),
        ({"target_extrapolation": "damped", "target_refresh_every_n_steps": 1}, "`target_extrapolation='damped'` extrapolates g_V .* got target_refresh_every_n_steps=1"),
        (
            {"target_extrapolation": "linear", "every_n_steps": 10},
            r"needs target_refresh_every_n_steps > every_n_steps .* got target_refresh_every_n_steps=10, every_n_steps=10",
        ),
        ({"release_stale_gradients": "no"}, "`release_stale_gradients` must be True or False; got 'no'"),
        ({"stream_products": 0}, "`stream_products` must be True or False; got 0"),
        ({"target_extrapolation": True, "target_refresh_every_n_steps": 1}, "needs target_refresh_every_n_steps > every_n_steps .* got target_refresh_every_n_steps=1"),
        (
            {"target_extrapolation": True, "schedule": "checkpoints", "num_checkpoints": 2, "second_order": "paper"},
            "schedule='in_run'; got target_refresh_every_n_steps=10, every_n_steps=1, schedule='checkpoints'",
        ),
    ],
)
def test_checks_name_argument_rule_and_value(options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        DiffInSettings(**options)


def test_readme_option_table_is_the_generated_one():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert DiffInSettings.markdown_table() in readme, "regenerate with: python -m diffin_lightning.settings"


def test_target_extrapolation_without_a_dataset_target_is_refused(tiny_data):
    with pytest.raises(ValueError, match=r"`target_extrapolation=True` extrapolates a dataset target's g_V, but `targets` holds none \(only \['self', 'train'\]\)"):
        DiffInCallback(targets={"self": "self", "train": "train"}, target_extrapolation=True)


def test_extrapolation_has_its_own_state_key_and_the_others_keep_theirs(tiny_data):
    """Callbacks that differ only in target_extrapolation share a Trainer (the schedule benchmark does), so each
    mode has its own key; the automatic choice ('damped') adds nothing, so a default run's key is the one its
    checkpoints were saved under before 'damped' existed, and 'linear' keeps the True it was saved under."""
    keys = {
        x: DiffInCallback(targets={"val": tiny_data.val}, target_extrapolation=x).state_key
        for x in (None, "damped", "linear", True, "none", False)
    }
    assert keys[None] == keys["damped"] and "target_extrapolation" not in keys[None]
    assert keys["linear"] == keys[True] and "'target_extrapolation': True" in keys["linear"]
    assert keys["none"] == keys[False] and "'target_extrapolation': 'none'" in keys["none"]
    assert len({keys[None], keys["linear"], keys["none"]}) == 3
    # Refreshed every step there is nothing to extrapolate: holding is the automatic choice, and unnamed.
    every_step = (
        DiffInCallback(targets={"val": tiny_data.val}, target_refresh_every_n_steps=1, target_extrapolation=x).state_key for x in (None, False)
    )
    assert len(set(every_step)) == 1


def test_extrapolation_resolves_automatically_where_refreshes_leave_gaps():
    assert DiffInSettings().resolved_target_extrapolation == "damped"
    assert DiffInSettings(target_refresh_every_n_steps=1).resolved_target_extrapolation == "none"
    # Recorded every 10 steps with g_V refreshed every 10: every recorded step refreshes, no slope is held.
    assert DiffInSettings(every_n_steps=10).resolved_target_extrapolation == "none"
    assert DiffInSettings(every_n_steps=4, target_refresh_every_n_steps=5).resolved_target_extrapolation == "damped"
    assert DiffInSettings(schedule="checkpoints", num_checkpoints=2, second_order="paper").resolved_target_extrapolation == "none"
    assert DiffInSettings(target_extrapolation=True).resolved_target_extrapolation == "linear"
    assert DiffInSettings(target_extrapolation=False).resolved_target_extrapolation == "none"
    assert DiffInSettings(target_extrapolation="linear").to_dict()["target_extrapolation"] == "linear"
    assert DiffInSettings().to_dict()["target_extrapolation"] == "damped"  # the metadata says what ran
