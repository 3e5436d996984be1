"""Sample ids: the id space ``[0, N)`` they index, reading them from a batch, and their checks.

Every score is indexed by a sample id, so an id out of range or repeated within a step would put
one sample's contribution on another's: each is refused with the fix in its message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffin_lightning.data import INDEX_KEY, find_indexed_dataset


def default_index_fn(batch: Any) -> Tensor:
    """The ids when no ``index_fn`` is given: ``batch["index"]``, as :class:`~diffin_lightning.IndexedDataset` yields."""
    if not isinstance(batch, Mapping) or INDEX_KEY not in batch:
        raise ValueError(
            "DiffInCallback: the training batch carries no sample ids. The default `index_fn` reads "
            f"batch[{INDEX_KEY!r}], but the batch is a {type(batch).__name__}"
            + (f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else "")
            + ". Wrap the training dataset in diffin_lightning.IndexedDataset, or pass "
            "index_fn=lambda batch: <LongTensor of sample ids>."
        )
    return batch[INDEX_KEY]


def id_space(dataset: Any, configured: int | None, ids_are_positions: bool) -> tuple[int, Any]:
    """``(N, what the fingerprint covers)`` for a training set whose ids lie in ``[0, N)``.

    The second is handed to :func:`~diffin_lightning.data.dataset_fingerprint`: the
    IndexedDataset the ids index (also under a Subset), else the dataset, else N alone.

    ``dataset``: the train dataloader's dataset where it has a length, else ``None``;
    ``configured``: the ``num_samples`` option; ``ids_are_positions``: the ids are read by
    :func:`default_index_fn` (with an ``index_fn`` of one's own the ids are one's own too).
    """
    # One rule for N: ids lie in [0, N). With an IndexedDataset (also under Subset wrappers) the ids
    # are its positions, so N is its length; otherwise N is the dataset's length or num_samples.
    # With an index_fn of one's own the ids are one's own too: then N is num_samples or the length.
    indexed = find_indexed_dataset(dataset) if ids_are_positions else None
    space = len(indexed) if indexed is not None else (len(dataset) if dataset is not None else None)
    num_samples = configured if configured is not None else space
    if num_samples is None:
        raise ValueError(
            "DiffInCallback could not tell the number of training samples N: the train dataloader's "
            "dataset has no length. Pass num_samples=N (ids lie in [0, N))."
        )
    if indexed is not None and configured is not None and configured != len(indexed):
        raise ValueError(
            f"`num_samples` is {configured} but the training ids come from an IndexedDataset of "
            f"{len(indexed)} samples (ids are its positions, also under a Subset). Leave num_samples=None "
            f"or pass num_samples={len(indexed)}."
        )
    if indexed is None and dataset is not None and num_samples < len(dataset):
        raise ValueError(
            f"`num_samples` (N: ids lie in [0, N)) is {num_samples} but the train dataloader's dataset holds "
            f"{len(dataset)} samples, each needing its own id. Pass num_samples >= {len(dataset)} (the largest "
            "id + 1), or leave it None."
        )
    # The fingerprint covers the id space: the IndexedDataset the ids index (also under a Subset).
    return num_samples, indexed if indexed is not None else (dataset if dataset is not None else num_samples)


class SampleIdChecks:
    """Turns what ``index_fn`` gave into a checked 1-d long tensor of ids; remembers whether their range was read back."""

    def __init__(self) -> None:
        self._range_checked = False

    def checked(self, raw_ids: Any, device: torch.device, num_samples: int | None) -> Tensor:
        ids = torch.as_tensor(raw_ids, device=device)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"DiffInCallback: sample ids must be a 1-d integer tensor [B]; `index_fn` gave dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}."
            )
        ids = ids.long()
        assert num_samples is not None
        # Reading ids back costs a host synchronisation on an accelerator: check every batch on the
        # CPU, and on the first batch elsewhere (out-of-range ids then fail in index_add_ itself).
        if ids.numel() and (ids.device.type == "cpu" or not self._range_checked):
            self._range_checked = True
            check_id_range(ids, num_samples)
        return ids


def check_id_range(ids: Tensor, num_samples: int) -> None:
    """Raise unless every id lies in ``[0, num_samples)`` (reads the ids' extremes back to the host)."""
    if int(ids.min()) < 0 or int(ids.max()) >= num_samples:
        raise ValueError(
            f"DiffInCallback: sample ids must lie in [0, N) with N={num_samples}; the batch holds ids from "
            f"{int(ids.min())} to {int(ids.max())}. Wrap the training dataset in IndexedDataset (a Subset "
            "goes around it: ids stay the wrapped dataset's), or, with ids of your own, pass num_samples = the "
            f"largest id in the whole training set + 1 (at least {int(ids.max()) + 1})."
        )


def repeated_ids_error(ids: Tensor, step: int) -> ValueError | None:
    """The error for ids that repeat within one optimizer step (checked on the CPU only: a read back elsewhere), else ``None``.

    Returned, not raised: under DDP every rank raises a rank's error together, at the step's agreement point.
    """
    if ids.device.type == "cpu" and ids.unique().numel() != ids.numel():
        return ValueError(
            f"DiffInCallback: sample ids must not repeat within an optimizer step; step {step} holds "
            f"{ids.numel() - ids.unique().numel()} repeated ids. Sample without replacement (a plain "
            "shuffling DataLoader does) so each sample appears at most once per step."
        )
    return None
