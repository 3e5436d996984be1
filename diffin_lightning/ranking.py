"""Rankings read straight from an influence file: the k most harmful or helpful samples, or given ids' scores.

At N = 10M a result holds dozens of ``[N]`` float64 tensors; ranking needs one. :func:`top_k`
and :func:`select` read only the tensor they rank (``safetensors.safe_open``), or take an
:class:`~diffin_lightning.store.InfluenceResult` already in memory.

Sign convention: positive = the sample helped the target, negative = harmful. So
``largest=False`` (the default) gives the most harmful samples first (the data-cleaning
order) and ``largest=True`` the most helpful (the coreset order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from diffin_lightning.store import COMPONENTS, METADATA_FILE, PENDING_METADATA_FILE, InfluenceResult, read_one_tensor

ResultSource = InfluenceResult | str | os.PathLike[str]


class Ranked(NamedTuple):
    """The ranked samples: ``ids`` (int64 ``[k]``) and their ``scores`` (``[k]``), best first."""

    ids: Tensor
    scores: Tensor


def _scores(source: ResultSource, target: str, component: str, verify_checksum: bool) -> Tensor:
    if component not in COMPONENTS:
        raise ValueError(f"`component` must be one of {COMPONENTS}; got {component!r}.")
    if isinstance(source, InfluenceResult):
        if target not in source.targets:
            raise KeyError(f"`target` {target!r} is not in this result; it has {sorted(source.targets)}.")
        return source[target].component(component)
    directory = Path(source)
    metadata_file = directory if directory.is_dir() else directory.parent
    kinds = _target_kinds(metadata_file)
    if kinds is not None and target not in kinds:
        raise KeyError(f"`target` {target!r} is not in {metadata_file}; it has {sorted(kinds)}.")
    return read_one_tensor(source, f"{target}/{component}", verify_checksum=verify_checksum)[1]


def _target_kinds(directory: Path) -> dict[str, str] | None:
    """The metadata's targets, read before the checked read so a wrong name gets its own message."""
    import json

    # The pending metadata where no metadata file is there yet (a first write killed between its renames).
    file = directory / METADATA_FILE
    if not file.is_file():
        file = directory / PENDING_METADATA_FILE
    try:
        kinds = json.loads(file.read_text()).get("target_kinds")
    except (OSError, ValueError, AttributeError):
        return None  # read_one_tensor explains what is wrong with the file
    return kinds if isinstance(kinds, dict) else None


def top_k(
    source: ResultSource,
    target: str,
    k: int,
    component: str = "diffin",
    largest: bool = False,
    verify_checksum: bool = False,
) -> Ranked:
    """The ``k`` samples with the lowest (``largest=False``: most harmful) or highest (most helpful) score.

    Ties are broken by the smaller sample id, so the ranking is deterministic. Cost: one
    ``topk`` over ``N`` plus a sort of the candidates that tie with the k-th score.

    Args:
        source: an influence result, or the directory (or either file) ``save_influence`` wrote;
            from a file only the ranked tensor is read.
        target: the target's name (``"val"``, ``"train"``, ...).
        k: how many samples, ``0 <= k <= N``.
        component: ``"diffin"``, ``"first_order"``, ``"second_order"`` or ``"visits"``.
        largest: ``False`` = most negative first (most harmful); ``True`` = most positive first.
        verify_checksum: also check the whole tensor file against its recorded SHA-256 (reads
            the file once more, in chunks); ``load_influence`` always does.

    Example::

        >>> import torch
        >>> from diffin_lightning import InfluenceResult, TargetInfluence
        >>> scores = torch.tensor([0.5, -2.0, 1.0, -2.0], dtype=torch.float64)
        >>> result = InfluenceResult({"val": TargetInfluence("val", "dataset", scores, 0 * scores, scores, 1 + 0 * scores)}, {"num_samples": 4})
        >>> top_k(result, "val", 2).ids.tolist()
        [1, 3]
    """
    values = _scores(source, target, component, verify_checksum)
    n = int(values.numel())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"`k` must be an int in [0, N] with N={n}; got {k!r}. Pass k <= N.")
    if k == 0:
        return Ranked(torch.zeros(0, dtype=torch.int64), values[:0].clone())
    if bool(torch.isnan(values).any()):
        raise ValueError(
            f"top_k: {target}/{component} holds {int(torch.isnan(values).sum())} NaN scores, which have no rank; "
            "re-record the run (non-finite contributions are normally skipped) or rank another component."
        )
    kth = torch.topk(values, k, largest=largest, sorted=False).values
    threshold = kth.min() if largest else kth.max()
    # Every sample at least as good as the k-th score, in id order; a stable sort by score then
    # keeps equal scores in id order.
    candidates = torch.nonzero(values >= threshold if largest else values <= threshold).squeeze(1)
    order = torch.sort(values[candidates], descending=largest, stable=True).indices[:k]
    ids = candidates[order]
    return Ranked(ids, values[ids])


def select(source: ResultSource, target: str, ids: Tensor, component: str = "diffin", verify_checksum: bool = False) -> Tensor:
    """The scores of the samples ``ids`` (any shape of int ids in ``[0, N)``), read from a result or a file.

    Example::

        >>> import torch
        >>> from diffin_lightning import InfluenceResult, TargetInfluence
        >>> s = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
        >>> select(InfluenceResult({"val": TargetInfluence("val", "dataset", s, s, s, s)}, {"num_samples": 3}), "val", torch.tensor([2, 0])).tolist()
        [1.0, 0.5]
    """
    values = _scores(source, target, component, verify_checksum)
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"`ids` must be integer sample ids; got dtype {ids.dtype}. Pass a LongTensor of ids.")
    n = int(values.numel())
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise IndexError(f"`ids` must lie in [0, N) with N={n}; got ids from {int(ids.min())} to {int(ids.max())}.")
    return values[ids.to(torch.int64)]

