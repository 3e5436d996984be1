"""Sample ids, replayable order and the data-set fingerprint."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from diffin_lightning import EpochSeededSampler, IndexedDataset, dataset_fingerprint


def test_items_gain_their_id():
    pairs = IndexedDataset(TensorDataset(torch.arange(6.0).view(3, 2), torch.tensor([1, 0, 1])))
    assert pairs[2]["index"] == 2 and torch.equal(pairs[2]["input"], torch.tensor([4.0, 5.0])) and pairs[2]["target"] == 1
    dicts = IndexedDataset([{"x": 1}, {"x": 2}])
    assert dicts[1] == {"x": 2, "index": 1}
    singles = IndexedDataset([torch.zeros(2), torch.ones(2)])
    assert singles[1]["index"] == 1 and torch.equal(singles[1]["input"], torch.ones(2))


def test_a_clashing_index_key_is_refused():
    with pytest.raises(KeyError, match="already have a key 'index'"):
        IndexedDataset([{"index": 5}])[0]


def test_labels_come_without_a_pass_when_they_can():
    data = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 1])))
    assert torch.equal(data.labels(), torch.tensor([2, 0, 1]))
    assert IndexedDataset([torch.zeros(2)]).labels() is None


def test_fingerprint_tracks_size_and_labels():
    labels = torch.tensor([0, 1, 1])
    assert dataset_fingerprint(3, labels) == dataset_fingerprint(3, labels.clone())
    assert dataset_fingerprint(3, labels) != dataset_fingerprint(3, torch.tensor([1, 1, 1]))
    assert dataset_fingerprint(3, None) != dataset_fingerprint(4, None)


def test_epoch_seeded_order_is_replayable_and_changes_per_epoch():
    sampler = EpochSeededSampler(50, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    again = EpochSeededSampler(50, seed=3)
    again.set_epoch(2)
    assert list(again) == first and sorted(first) == list(range(50))
    sampler.set_epoch(3)
    assert list(sampler) != first
    assert list(EpochSeededSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="`num_samples` must be a positive int"):
        EpochSeededSampler(0)
