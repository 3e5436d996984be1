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
        # A string "false" is truthy: accepted as given it turned the second order on (found in review).
        ({"compute_second_order": "false"}, "`compute_second_order` must be True or False; got 'false'. Example: compute_second_order=False"),
        ({"save_on_checkpoint": "yes"}, "`save_on_checkpoint` must be True or False; got 'yes'"),
        ({"allow_batch_mixing": 1}, "`allow_batch_mixing` must be True or False; got 1"),
        ({"cache_target_on_device": None}, "`cache_target_on_device` must be True or False; got None"),
        ({"seed": 1.5}, "`seed` must be an int; got 1.5. Example: seed=0"),
        ({"seed": True}, "`seed` must be an int; got True"),
        ({"output_dir": 3}, r"`output_dir` must be a path \(str or os.PathLike\) or None .*; got int 3. Example: output_dir="),
        ({"eps": float("inf")}, "`eps` must be a positive float or None \\(automatic\\), and finite; got inf"),
        # Each positive-int option's error suggests a value of its own (it once said "Use 1 for every step" to all).
        ({"target_batch_size": 0}, "`target_batch_size` must be a positive int; got 0. Example: target_batch_size=256, or None"),
        ({"training_set_batch_size": -2}, "`training_set_batch_size` must be a positive int; got -2. Example: training_set_batch_size=512"),
        ({"schedule": "checkpoints", "num_checkpoints": 0}, "`num_checkpoints` must be a positive int; got 0. Example: num_checkpoints=5"),
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


@pytest.mark.parametrize(
    ("targets", "options", "inert"),
    [
        (
            {"val": None},
            {"compute_second_order": False, "eps": 1e-3, "finite_difference": "central", "second_order": "sum", "training_set_batch_size": 64},
            ["second_order", "finite_difference", "eps", "training_set_batch_size"],
        ),
        ({"s": "self"}, {"target_max_samples": 10, "target_refresh_every_n_steps": 3, "target_batch_size": 8, "cache_target_on_device": False}, ["target_batch_size", "target_max_samples", "target_refresh_every_n_steps", "cache_target_on_device"]),
        ({"val": None}, {"train_target_decay": 0.5}, ["train_target_decay"]),
        ({"val": None, "train": "train"}, {"self_chunk_size": 4}, ["self_chunk_size"]),
        ({"val": None}, {"schedule": "checkpoints", "num_checkpoints": 2, "dot_products": "functional", "reuse_training_step": True, "target_refresh_every_n_steps": 3}, ["target_refresh_every_n_steps", "dot_products", "reuse_training_step"]),
        ({"val": None}, {"dot_products": "functional", "reuse_training_step": True, "stream_products": False}, ["reuse_training_step", "stream_products"]),
        ({"val": "loader"}, {"target_batch_size": 2, "cache_target_on_device": False, "target_max_samples": 3}, ["target_batch_size", "cache_target_on_device"]),
    ],
    ids=["first-order", "no-dataset-target", "no-train-target", "no-self-target", "checkpoints", "functional", "loader-target"],
)
def test_options_this_combination_never_reads_are_named_in_one_warning(tiny_data, targets, options, inert):
    """An option accepted and silently ignored reads as if it had acted: each is named with why and the fix."""
    from torch.utils.data import DataLoader

    from diffin_lightning import IndexedDataset

    # None: the validation Dataset; "loader": the same in a DataLoader (max_samples still applies to it).
    loader = DataLoader(IndexedDataset(tiny_data.val), batch_size=3)
    targets = {name: tiny_data.val if value is None else loader if value == "loader" else value for name, value in targets.items()}
    with pytest.warns(UserWarning, match="DiffInCallback: ") as caught:
        DiffInCallback(targets=targets, **options)
    (warning,) = [w for w in caught if "has no effect" in str(w.message)]
    named = [part.split("=")[0].strip("` ") for part in str(warning.message).removeprefix("DiffInCallback: ").split(". `")]
    assert named == inert, str(warning.message)
    assert "Drop it, or" in str(warning.message)


def test_defaults_and_the_bundled_configs_warn_of_no_inert_option(tiny_data, recwarn):
    """What the library and its Hydra configs set by default is all read (no warning a user would learn to ignore)."""
    import yaml

    DiffInCallback(targets={"val": tiny_data.val, "train": "train", "self": "self"})
    folder = Path(__file__).parent.parent / "diffin_lightning" / "configs" / "influence"
    base = yaml.safe_load((folder / "diffin.yaml").read_text())
    for path in folder.glob("*.yaml"):
        config = {**base, **yaml.safe_load(path.read_text())}
        options = {k: v for k, v in config.items() if k not in ("_target_", "targets", "defaults")}
        assert DiffInSettings(**options).inert_options(["dataset", "self"]) == [], path.name
    assert [str(w.message) for w in recwarn if "has no effect" in str(w.message)] == []


def test_the_train_targets_decay_has_its_own_state_key_and_the_default_keeps_the_old_one(tiny_data):
    """Callbacks differing only in the 'train' target's decay record different numbers: each resumes its own state.
    The default adds nothing to the key (checkpoints saved before the decay was part of it resume under theirs)."""
    keys = {decay: DiffInCallback(targets={"train": "train"}, train_target_decay=decay).state_key for decay in (0.9, 0.5, 0.99)}
    assert "train_target_decay" not in keys[0.9] and "'train_target_decay': 0.5" in keys[0.5]
    assert len(set(keys.values())) == 3


def test_more_checkpoints_than_steps_warns_and_records_every_step(tmp_path, tiny_data):
    from helpers import TinyClassifier, trainer

    callback = DiffInCallback(targets={"val": tiny_data.val}, schedule="checkpoints", num_checkpoints=9, second_order="paper")
    with pytest.warns(UserWarning, match=r"`num_checkpoints=9` exceeds the run's 4 optimizer step\(s\); every step is a checkpoint \(4 in all"):
        trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback.checkpoint_steps == [0, 1, 2, 3] and callback.steps_recorded == 4
