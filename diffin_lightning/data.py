"""Datasets and samplers that give every training sample a stable id.

The callback attributes influence to sample ids, so every batch must say which
samples it holds. :class:`IndexedDataset` adds the id to each item;
:class:`EpochSeededSampler` gives a shuffled order that depends only on
``(seed, epoch)``, so that a resumed run and leave-one-out retraining see the
same batches as the original run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that each item carries its id under ``"index"``.

    Items become dictionaries:

    - a ``(input, target)`` pair becomes ``{"index": i, "input": x, "target": y}``;
    - a mapping keeps its keys and gains ``"index"``;
    - anything else becomes ``{"index": i, "input": item}``.

    Args:
        dataset: any map-style dataset with ``__len__``.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> sorted(ds[1].keys()), int(ds[1]["index"])
        (['index', 'input', 'target'], 1)
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                "`dataset` must be a map-style Dataset with __len__ and __getitem__; "
                f"got {type(dataset).__name__}. Wrap an iterable dataset's items in a list first."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if INDEX_KEY in item:
                raise KeyError(
                    f"IndexedDataset: the wrapped dataset's items already have a key {INDEX_KEY!r}; "
                    "rename it so that the sample id is unambiguous."
                )
            return {**item, INDEX_KEY: index}
        if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
            return {INDEX_KEY: index, "input": item[0], "target": item[1]}
        return {INDEX_KEY: index, "input": item}

    def labels(self) -> torch.Tensor | None:
        """The labels of all samples in id order, or ``None`` where items have none.

        Reads a ``targets`` attribute or the second tensor of a ``TensorDataset``
        when there is one (no pass over the data), else each item's ``"target"``.
        """
        inner = self.dataset
        if hasattr(inner, "targets"):
            return torch.as_tensor(inner.targets)
        tensors = getattr(inner, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) == 2:
            return tensors[1]
        labels = []
        for index in range(len(self)):
            target = self[index].get("target")
            if target is None:
                return None
            labels.append(torch.as_tensor(target))
        return torch.stack(labels) if labels else None


def dataset_fingerprint(num_samples: int, labels: torch.Tensor | None) -> str:
    """A short hash of the training set's size, ids and labels.

    Influence scores are only meaningful for the data they were recorded on; the
    fingerprint lets a reader refuse scores recorded on another data set.
    """
    digest = hashlib.sha256()
    digest.update(f"N={num_samples};ids=0..{num_samples - 1};".encode())
    if labels is None:
        digest.update(b"labels=none")
    else:
        # hashlib reads the array's buffer directly: no bytes copy of N labels.
        digest.update(labels.detach().to("cpu", torch.int64).contiguous().numpy())
    return digest.hexdigest()[:16]


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order is a function of ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed
    from a checkpoint draws exactly the batches the uninterrupted run drew, and a
    retrained model can replay the original batch order.

    Args:
        num_samples: the dataset's length.
        seed: the base seed of the shuffle.
        shuffle: ``False`` gives the identity order.

    Example::

        >>> sampler = EpochSeededSampler(5, seed=0)
        >>> sampler.set_epoch(1)
        >>> sorted(sampler) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int; got {num_samples!r}.")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The ids in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        # Python ints a chunk at a time: a list of all N ids costs ~36 bytes per sample (360 MB at 10M)
        # and a second at every epoch start, while the DataLoader only ever needs the next batch.
        if not self.shuffle:
            yield from range(self.num_samples)
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        for chunk in permutation.split(65536):
            yield from chunk.tolist()

    def __len__(self) -> int:
        return self.num_samples
