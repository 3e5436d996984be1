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
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset, TensorDataset

INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that each item carries its id under ``"index"``.

    Items become dictionaries:

    - a ``(input, target)`` pair becomes ``{"index": i, "input": x, "target": y}``;
    - a mapping keeps its keys and gains ``"index"``;
    - anything else becomes ``{"index": i, "input": item}``.

    Ids are positions in ``dataset``. Put a ``torch.utils.data.Subset`` around it (not inside)
    to train on part of it: the ids stay those of ``dataset`` and N is ``len(dataset)``.

    Args:
        dataset: any map-style dataset with ``__len__``.
        existing_index: what to do with a mapping item that already has an ``"index"`` key:
            ``"refuse"`` (training data: the id would be ambiguous) or ``"keep"`` the item as
            it is (targets, which need no ids).

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> sorted(ds[1].keys()), int(ds[1]["index"])
        (['index', 'input', 'target'], 1)
    """

    def __init__(self, dataset: Dataset, existing_index: Literal["refuse", "keep"] = "refuse") -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                "`dataset` must be a map-style Dataset with __len__ and __getitem__; "
                f"got {type(dataset).__name__}. Wrap an iterable dataset's items in a list first."
            )
        if existing_index not in ("refuse", "keep"):
            raise ValueError(f"`existing_index` must be 'refuse' or 'keep'; got {existing_index!r}.")
        self.dataset = dataset
        self.existing_index = existing_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if INDEX_KEY in item:
                if self.existing_index == "keep":
                    return item
                raise KeyError(
                    f"IndexedDataset: the wrapped dataset's items already have a key {INDEX_KEY!r}. If they are "
                    "the sample ids (each sample's position in the training set), use the dataset without "
                    "IndexedDataset: the callback reads batch['index']; otherwise rename the key."
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


def find_indexed_dataset(dataset: Any) -> IndexedDataset | None:
    """The :class:`IndexedDataset` that gives ``dataset``'s ids, looking through ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, IndexedDataset) else None


CONTENT_KEY_ATTRIBUTE = "content_key"
_CHUNK_BYTES = 64 * 1024 * 1024  # hash in-memory tensors a slice of rows at a time


class _LeafDigest:
    """The hash of one field (``input``, ``target``, ...) over all samples in id order.

    Rows are hashed as raw bytes; the dtype and the run-length encoded row shapes are
    folded in at the end, so that one big slice of rows and many single rows hash the same
    and rows of different shapes cannot be confused.
    """

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.dtypes: list[str] = []
        self.runs: list[list[Any]] = []  # [row shape, count]

    def add_rows(self, rows: torch.Tensor) -> None:
        """``rows`` is ``[n, *row_shape]``."""
        rows = rows.detach().to("cpu").contiguous()
        if str(rows.dtype) not in self.dtypes:
            self.dtypes.append(str(rows.dtype))
        shape = list(rows.shape[1:])
        if self.runs and self.runs[-1][0] == shape:
            self.runs[-1][1] += int(rows.shape[0])
        else:
            self.runs.append([shape, int(rows.shape[0])])
        if rows.numel():
            self.digest.update(memoryview(rows.reshape(-1).view(torch.uint8).numpy()))

    def add_text(self, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.digest.update(len(data).to_bytes(8, "little") + data)
        self.add_rows(torch.zeros(1, 0, dtype=torch.uint8))  # counts the row

    def summary(self) -> str:
        return f"{self.dtypes}{self.runs}{self.digest.hexdigest()}"


def _add_item(leaves: dict[str, _LeafDigest], path: str, value: Any) -> None:
    """Hash one sample's field (recursing into mappings and sequences) into its leaf's digest."""
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            if path == "" and key == INDEX_KEY:
                continue  # the id is the position, hashed by the order of the rows
            _add_item(leaves, f"{path}/{key}", value[key])
        return
    if isinstance(value, (str, bytes)):
        leaves.setdefault(path, _LeafDigest()).add_text(value)
        return
    if isinstance(value, Sequence):
        for position, element in enumerate(value):
            _add_item(leaves, f"{path}/{position}", element)
        return
    if value is None:
        leaves.setdefault(path, _LeafDigest()).add_text(b"\x00None")
        return
    try:
        tensor = torch.as_tensor(value) if isinstance(value, (bool, int, float, complex, torch.Tensor)) or hasattr(value, "__array__") else None
    except (TypeError, RuntimeError, ValueError):
        tensor = None
    if tensor is not None:
        leaves.setdefault(path, _LeafDigest()).add_rows(tensor.unsqueeze(0))
        return
    raise TypeError(
        f"dataset_fingerprint: sample field {path or '<item>'!r} is a {type(value).__name__}, which has no stable "
        "bytes to hash (tensors, arrays, numbers, strings and their lists and dicts do). Give the dataset a "
        f"`{CONTENT_KEY_ATTRIBUTE}` attribute (a string that changes whenever its content does, e.g. a hash of its "
        "file list and sizes), or pass content_key=... to dataset_fingerprint."
    )


def _tensor_rows(dataset: Any) -> tuple[tuple[torch.Tensor, ...], Any] | None:
    """``(tensors, indices)`` when the samples are rows of in-memory tensors (fast path), else None."""
    indices = None
    if isinstance(dataset, Subset):
        indices, dataset = torch.as_tensor(dataset.indices, dtype=torch.long), dataset.dataset
    tensors = getattr(dataset, "tensors", None)
    if not isinstance(dataset, TensorDataset) or not isinstance(tensors, tuple):
        return None
    return tensors, indices


def dataset_fingerprint(
    data: Dataset | int,
    *,
    content_key: str | None = None,
    batch_size: int = 1024,
) -> str:
    """A hash of the training set's size, order and content: every sample's tensors, in id order.

    Influence scores are indexed by sample id and only mean something for the data they were
    recorded on; the fingerprint lets a reader refuse scores recorded on other data, including
    the same labels with other inputs and samples reordered within a class.

    Samples stored as rows of in-memory tensors (``TensorDataset``, a ``Subset`` of one, either
    wrapped in :class:`IndexedDataset`) are hashed a slice of rows at a time without touching
    single samples (about a second per GB). Other datasets are read once in id order through a
    ``DataLoader`` of ``batch_size``; where that is too slow (files on disk, remote storage),
    give the dataset a ``content_key`` attribute, or pass ``content_key``: a string that changes
    whenever the content does (a manifest's hash, a data version). The fingerprint then covers
    N and that key instead of the samples.

    Args:
        data: the training dataset (map-style, with a length), or just N where there is no
            dataset to read (the fingerprint then covers N only).
        content_key: the user's own content identifier; overrides hashing the samples.
        batch_size: samples per read on the general path.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> x, y = torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0])
        >>> same = dataset_fingerprint(TensorDataset(x, y)) == dataset_fingerprint(IndexedDataset(TensorDataset(x.clone(), y)))
        >>> swapped = dataset_fingerprint(TensorDataset(x[[2, 1, 0]], y))  # rows 0 and 2 share a label
        >>> same, swapped == dataset_fingerprint(TensorDataset(x, y))
        (True, False)
    """
    if isinstance(data, bool) or not isinstance(data, int) and not hasattr(data, "__len__"):
        raise TypeError(f"`data` must be a map-style Dataset with a length, or N as an int; got {type(data).__name__}.")
    num_samples = data if isinstance(data, int) else len(data)  # type: ignore[arg-type]
    head = f"diffin-fingerprint-v2;N={num_samples};"
    inner = data.dataset if isinstance(data, IndexedDataset) else data
    if content_key is None and not isinstance(data, int):
        content_key = getattr(data, CONTENT_KEY_ATTRIBUTE, None) or getattr(inner, CONTENT_KEY_ATTRIBUTE, None)
    if content_key is not None:
        if not isinstance(content_key, str) or not content_key:
            raise TypeError(f"`content_key` must be a non-empty string; got {content_key!r}.")
        return hashlib.sha256(f"{head}content_key={content_key}".encode()).hexdigest()[:32]
    if isinstance(data, int):
        return hashlib.sha256(f"{head}content=unknown".encode()).hexdigest()[:32]
    leaves: dict[str, _LeafDigest] = {}
    rows = _tensor_rows(inner)
    if rows is not None:
        tensors, indices = rows
        for position, tensor in enumerate(tensors):
            leaf = leaves.setdefault(f"/{position}", _LeafDigest())
            row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if len(tensor) else 1
            step = max(1, _CHUNK_BYTES // row_bytes)
            for start in range(0, num_samples, step):
                chosen = slice(start, start + step) if indices is None else indices[start : start + step]
                leaf.add_rows(tensor[chosen])
    else:
        loader = DataLoader(inner, batch_size=batch_size, shuffle=False, collate_fn=list)  # type: ignore[arg-type]
        for items in loader:
            for item in items:
                _add_item(leaves, "", item)
    summary = ";".join(f"{path}:{leaf.summary()}" for path, leaf in sorted(leaves.items()))
    return hashlib.sha256(f"{head}{summary}".encode()).hexdigest()[:32]


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


class _SkippingBatchSampler(BatchSampler):
    """A BatchSampler that drops the first ``skip`` batches of its next pass (indices only, no data read)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for position, batch in enumerate(super().__iter__()):
            if position >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within the epoch travels in Lightning checkpoints.

    Lightning saves the ``state_dict()`` of a train dataloader that has one and restores it
    on resume. A run resumed from a checkpoint taken in the middle of an epoch then goes on
    with the next batch of that epoch, exactly as the uninterrupted run did, instead of
    starting the epoch's data again (a plain DataLoader: the first batches are trained twice).
    The position is a count of batches delivered; on resume the batch sampler skips that many
    batches of indices, reading no data. Exact when the sampler's order depends only on its
    epoch (:class:`EpochSeededSampler`, a sequential order), not on a global random state.

    Args:
        dataset: the training dataset.
        batch_size: samples per batch.
        sampler: the order of the ids; default sequential. Use :class:`EpochSeededSampler`
            to shuffle replayably.
        drop_last: drop the last incomplete batch.
        **kwargs: any other ``DataLoader`` argument (``num_workers``, ``collate_fn``, ...).

    Example::

        >>> loader = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochSeededSampler(10, seed=0))
        >>> first = next(iter(loader)).tolist()
        >>> state = loader.state_dict()
        >>> state["batches"]
        1
        >>> resumed = ResumableDataLoader(list(range(10)), batch_size=4, sampler=EpochSeededSampler(10, seed=0))
        >>> resumed.load_state_dict(state)
        >>> [b.tolist() for b in resumed] == [b.tolist() for b in loader][1:]
        True
    """

    def __init__(
        self, dataset: Dataset, batch_size: int = 1, sampler: Sampler[int] | None = None, drop_last: bool = False, **kwargs: Any
    ) -> None:
        batch_sampler = kwargs.pop("batch_sampler", None)
        if kwargs.pop("shuffle", None) or (batch_sampler is not None and not isinstance(batch_sampler, _SkippingBatchSampler)):
            raise ValueError(
                "ResumableDataLoader builds its own batch sampler and takes no `shuffle`; pass "
                "sampler=EpochSeededSampler(len(dataset), seed=...) for a replayable shuffle."
            )
        if batch_sampler is None:  # (Lightning re-creates the loader with its own skipping batch sampler, e.g. under DDP)
            batch_sampler = _SkippingBatchSampler(sampler if sampler is not None else SequentialSampler(dataset), batch_size, drop_last)  # type: ignore[arg-type]
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._delivered = 0
        self._resume: dict[str, Any] | None = None

    def _epoch(self) -> int | None:
        return getattr(self.batch_sampler.sampler, "epoch", None)  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        resume, self._resume = self._resume, None
        start = 0
        if resume is not None and resume.get("epoch") == self._epoch() and 0 < int(resume.get("batches", 0)) < len(self):
            start = int(resume["batches"])
        self.batch_sampler.skip = start  # type: ignore[union-attr]
        self._delivered = start
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches"}``: the sampler's epoch and how many batches of it were delivered."""
        return {"epoch": self._epoch(), "batches": self._delivered}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the next pass after ``state_dict["batches"]`` batches, if it is the same epoch."""
        self._resume = dict(state_dict)


def inexact_resume_reason(loader: Any, mid_epoch: bool) -> str | None:
    """Why a run resumed with this train ``loader`` cannot continue exactly as it would have, or None.

    Args:
        loader: the train dataloader Lightning iterates.
        mid_epoch: the checkpoint was taken inside an epoch (a step-based checkpoint).
    """
    stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    if isinstance(sampler, RandomSampler) and sampler.generator is None:
        return (
            "the train dataloader shuffles with the global random state (shuffle=True), which a checkpoint does not "
            "restore, so the resumed run visits the samples in another order"
        )
    if mid_epoch and not stateful:
        return (
            "the checkpoint was taken in the middle of an epoch and the train dataloader cannot restore its position "
            "(no state_dict/load_state_dict), so Lightning starts the epoch's data again and its first batches are "
            "trained twice"
        )
    return None
