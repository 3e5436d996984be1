"""Long passes say what they do: the end-of-fit drift pass has a progress bar of its own."""

from __future__ import annotations

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


def test_the_drift_pass_shows_its_own_bar_and_only_with_the_trainers_bar(tmp_path, tiny_data, capfd):
    for shown in (True, False):
        callback = DiffInCallback(targets={"val": tiny_data.val}, output_dir=tmp_path / str(shown))
        trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback], enable_progress_bar=shown).fit(
            TinyClassifier().double(), tiny_data.loader()
        )
        assert ("DiffIn: end-of-fit drift pass" in capfd.readouterr().err) == shown
