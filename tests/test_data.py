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


def _pairs(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


class ListData(torch.utils.data.Dataset):
    """A dataset that is not rows of a tensor: the general (batched DataLoader) path."""

    def __init__(self, x, y):
        self.items = [(x[i], int(y[i])) for i in range(len(x))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_fingerprint_refuses_other_inputs_with_the_same_labels():
    x, y = _pairs()
    base = dataset_fingerprint(IndexedDataset(TensorDataset(x, y)))
    assert base == dataset_fingerprint(IndexedDataset(TensorDataset(x.clone(), y.clone())))
    other = x.clone()
    other[7, 1] += 1e-6  # one input, one coordinate, a tiny change: not the recorded data
    assert dataset_fingerprint(IndexedDataset(TensorDataset(other, y))) != base
    assert dataset_fingerprint(IndexedDataset(TensorDataset(x.double(), y))) != base  # same values, other dtype
    flipped = y.clone()
    flipped[3] = 1 - flipped[3]
    assert dataset_fingerprint(IndexedDataset(TensorDataset(x, flipped))) != base
    assert dataset_fingerprint(IndexedDataset(TensorDataset(x[:-1], y[:-1]))) != base


def test_fingerprint_refuses_samples_reordered_within_a_class():
    x, y = _pairs()
    same_class = (y == y[0]).nonzero().flatten()
    a, b = int(same_class[0]), int(same_class[1])
    order = torch.arange(len(y))
    order[a], order[b] = b, a
    assert torch.equal(y[order], y), "the labels alone cannot tell"
    assert dataset_fingerprint(TensorDataset(x[order], y[order])) != dataset_fingerprint(TensorDataset(x, y))


def test_fingerprint_paths_agree_and_key_on_content():
    x, y = _pairs(n=25)
    fast = dataset_fingerprint(IndexedDataset(TensorDataset(x, y)))
    # The general path reads items through a DataLoader; small batches must not change the hash.
    assert dataset_fingerprint(IndexedDataset(ListData(x, y)), batch_size=4) == fast
    assert dataset_fingerprint(ListData(x, y), batch_size=25) == fast
    subset = torch.utils.data.Subset(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), list(range(25, 50)))
    assert dataset_fingerprint(subset) == fast
    swapped = ListData(x, y)
    swapped.items[0], swapped.items[1] = swapped.items[1], swapped.items[0]
    assert dataset_fingerprint(swapped) != fast


def test_fingerprint_takes_a_content_key_instead_of_reading():
    x, y = _pairs()
    keyed = ListData(x, y)
    keyed.content_key = "manifest-sha256:0123"
    assert dataset_fingerprint(IndexedDataset(keyed)) == dataset_fingerprint(40, content_key="manifest-sha256:0123")
    assert dataset_fingerprint(keyed) != dataset_fingerprint(40, content_key="manifest-sha256:0124")
    assert dataset_fingerprint(3) != dataset_fingerprint(4)

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": object(), "target": 0}

    with pytest.raises(TypeError, match="sample field '/image' is a object.*`content_key` attribute"):
        dataset_fingerprint(Opaque())


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


def test_resumable_loader_skips_delivered_batches_and_survives_lightnings_distributed_rebuild():
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    from diffin_lightning import ResumableDataLoader

    loader = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochSeededSampler(10, seed=0))
    loader.batch_sampler.sampler.set_epoch(1)
    epoch_one = [b.tolist() for b in loader]
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 1}
    resumed = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochSeededSampler(10, seed=0))
    resumed.batch_sampler.sampler.set_epoch(1)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == epoch_one[1:]
    assert [b.tolist() for b in resumed] == epoch_one, "the skip applies to one pass only"
    other_epoch = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochSeededSampler(10, seed=0))
    other_epoch.load_state_dict(state)  # saved in epoch 1, iterated in epoch 0: nothing skipped
    assert len(list(other_epoch)) == 3
    with pytest.raises(ValueError, match="takes no `shuffle`"):
        ResumableDataLoader(list(range(10)), batch_size=4, shuffle=True)
    # Lightning rebuilds a train loader with a DistributedSampler under DDP; it must stay resumable.
    rebuilt = _update_dataloader(loader, DistributedSampler(list(range(10)), num_replicas=2, rank=0, shuffle=False))
    assert type(rebuilt) is ResumableDataLoader and [b.tolist() for b in rebuilt] == [[0, 2, 4, 6], [8]]
    assert rebuilt.state_dict() == {"epoch": 0, "batches": 2}


def test_retraining_on_kept_ids_visits_exactly_those_ids_in_the_recorded_order():
    # A retrain (delete / coreset verify) must see the kept samples, never the first len(kept) ids.
    from diffin_lightning.bundled.datamodule import KeptIdsSampler

    kept = [3, 8, 11, 19, 27, 40]
    sampler = KeptIdsSampler(kept, seed=5)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        visited = list(sampler)
        assert sorted(visited) == kept
        assert visited == sampler.order(epoch)
