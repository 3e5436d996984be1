"""Datasets the way users write them: items that carry their own ids, Subsets of an indexed set.

The rules under test: targets need no ids (items with an 'index' key are accepted, as a Dataset
and as a DataLoader, with the same scores); training ids are the positions in the dataset that
IndexedDataset wraps, also under a Subset, and N is that dataset's length; every error about N
names a fix that, followed, works.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffin_lightning import DiffInCallback, IndexedDataset
from helpers import TinyClassifier, trainer


class OwnDataset(Dataset):
    """One class for every split, yielding {"index", "input", "target"} as the README's contract asks."""

    def __init__(self, inputs, labels) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "input": self.inputs[i], "target": self.labels[i]}


def _fit(tmp_path, loader, **callback_kwargs) -> DiffInCallback:
    callback = DiffInCallback(output_dir=tmp_path / "influence", **callback_kwargs)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), loader)
    return callback


def test_a_target_whose_items_carry_an_index_is_accepted_as_dataset_and_as_dataloader(tmp_path, tiny_data):
    train = OwnDataset(*tiny_data.train.tensors)
    val = OwnDataset(*tiny_data.val.tensors)
    loader = lambda: DataLoader(train, batch_size=4, shuffle=False)  # noqa: E731
    as_dataset = _fit(tmp_path / "a", loader(), targets={"val": val}).influence["val"]
    as_loader = _fit(tmp_path / "b", loader(), targets={"val": DataLoader(val, batch_size=256)}).influence["val"]
    plain = _fit(tmp_path / "c", loader(), targets={"val": tiny_data.val}).influence["val"]  # (x, y) pairs
    # The DataLoader sums g_V over one batch of 6, the dataset over the micro-batch size (4 + 2): the
    # two g_V differ in the last bit, and the second order's curvature, a finite difference along g_V
    # (<eps u, G_B(theta + eps u)> - <eps u, G_B(theta)>, over eps^2), magnifies that by about 1/eps.
    for component, rtol in (("first_order", 1e-12), ("second_order", 1e-8), ("diffin", 1e-8)):
        assert torch.allclose(getattr(as_dataset, component), getattr(as_loader, component), rtol=rtol, atol=1e-15)
        assert torch.allclose(getattr(as_dataset, component), getattr(plain, component), rtol=rtol, atol=1e-15)
    assert as_dataset.first_order.abs().sum() > 0


def test_training_ids_stay_unambiguous():
    with pytest.raises(KeyError, match=r"already have a key 'index'.*without IndexedDataset"):
        IndexedDataset(OwnDataset(torch.zeros(2, 1), torch.zeros(2)))[0]


def test_subset_of_an_indexed_dataset_keeps_the_wrapped_ids_and_n(tmp_path, tiny_data):
    kept = list(range(0, 16, 2))
    subset = Subset(IndexedDataset(tiny_data.train), kept)
    scores = _fit(tmp_path / "auto", DataLoader(subset, batch_size=4), targets={"s": "self"}).influence["s"]
    assert scores.visits.shape == (16,)  # N is the wrapped dataset's length
    assert torch.equal(scores.visits.nonzero().flatten(), torch.tensor(kept))  # ids are its positions
    explicit = _fit(tmp_path / "explicit", DataLoader(subset, batch_size=4), targets={"s": "self"}, num_samples=16)
    assert torch.equal(explicit.influence["s"].first_order, scores.first_order)


def test_the_fix_an_error_about_n_names_works(tmp_path, tiny_data):
    subset = Subset(IndexedDataset(tiny_data.train), list(range(8)))
    with pytest.raises(ValueError, match="num_samples=16") as refused:
        _fit(tmp_path / "wrong", DataLoader(subset, batch_size=4), targets={"s": "self"}, num_samples=8)
    suggested = int(re.search(r"num_samples=(\d+)", str(refused.value)).group(1))
    _fit(tmp_path / "fixed", DataLoader(subset, batch_size=4), targets={"s": "self"}, num_samples=suggested)

    # Ids of one's own beyond the dataset's length: the error says N = the largest id + 1, which works.
    own = DataLoader(IndexedDataset(tiny_data.train), batch_size=4)
    shifted = lambda batch: batch["index"] + 100  # noqa: E731
    with pytest.raises(ValueError, match=r"num_samples = the largest id in the whole training set \+ 1 \(at least 10\d\)"):
        _fit(tmp_path / "own", own, targets={"s": "self"}, index_fn=shifted)
    scores = _fit(tmp_path / "own2", own, targets={"s": "self"}, index_fn=shifted, num_samples=115 + 1).influence["s"]
    assert torch.equal(scores.visits[100:], torch.full((16,), 2.0, dtype=torch.float64))


class _RenamedKeys(TinyClassifier):
    """A model whose batches come from a collate_fn of its own (keys renamed): the training step's layout."""

    def per_sample_loss(self, batch):
        import torch.nn.functional as F

        return F.cross_entropy(self(batch["features"]), batch["labels"], reduction="none")


def _renaming_collate(items):
    from torch.utils.data import default_collate

    batch = default_collate(items)
    return {"index": batch["index"], "features": batch["input"], "labels": batch["target"]}


@pytest.mark.parametrize("schedule", ["in_run", "checkpoints"])
def test_passes_over_the_training_set_use_the_training_loaders_collate_fn(tmp_path, tiny_data, schedule):
    """The end-of-fit pass (and each checkpoint's pass) batch the training set as the training loader does: with the
    default collate instead, a collate_fn of one's own failed after training (KeyError: 'features', found in review)."""
    from diffin_lightning import EpochSeededSampler

    class RenamedVal(Dataset):
        def __len__(self):
            return len(tiny_data.val)

        def __getitem__(self, i):
            x, y = tiny_data.val[i]
            return {"features": x, "labels": y}

    options = dict(eps=1e-6) if schedule == "in_run" else dict(eps=1e-6, schedule="checkpoints", num_checkpoints=2, second_order="paper")
    indexed = IndexedDataset(tiny_data.train)
    runs = []
    for model, collate, val in ((TinyClassifier(), None, tiny_data.val), (_RenamedKeys(), _renaming_collate, RenamedVal())):
        loader = DataLoader(indexed, batch_size=4, sampler=EpochSeededSampler(len(indexed), seed=0), **({"collate_fn": collate} if collate else {}))
        callback = DiffInCallback(targets={"val": val}, **options)
        trainer(default_root_dir=tmp_path / str(len(runs)), max_epochs=2, callbacks=[callback]).fit(model.double(), loader)
        runs.append(callback.influence["val"])
    for component in ("first_order", "second_order", "diffin"):
        torch.testing.assert_close(getattr(runs[1], component), getattr(runs[0], component), rtol=1e-12, atol=1e-15)
