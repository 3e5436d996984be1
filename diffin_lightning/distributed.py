"""Small collective helpers that let the callback run under DDP (``ddp``, ``ddp_spawn``).

Under DDP every rank trains on its shard of the global batch and DDP's backward
averages the ranks' gradients, so the update is ``theta - eta * mean_r G_{B_r}``
(the global batch's mean gradient when the ranks' batches are equally large). The
callback follows the same rule:

- each rank records its own samples; a sample on rank ``r`` weighs
  ``eta / (W |B_r|)`` (:func:`effective_batch_size`), its share of the update;
- quantities that define the step (the batch gradient, the batch gradient at the
  perturbed point, the curvature along the target direction) are the global ones:
  :func:`mean_over_ranks` averages them exactly as DDP averages ``.grad``;
- a target gradient is computed once: each rank takes a shard of the target set
  (:func:`shard_indices`, :func:`shard_batches`), sums its gradient, and
  :func:`sum_with_count_over_ranks` adds the shards and their sizes up;
- per-sample accumulators ``[N]`` hold each rank's own samples; every state combines
  across ranks by a sum (the decayed ones too: every rank multiplies by the same
  factor, and a sum commutes with that), so :func:`sum_over_ranks` at write and
  checkpoint time gives one score per sample;
- an error that one rank raises in the callback's checks is shared with the others by
  :func:`raise_if_any_rank_failed` before any collective maths, so every rank stops
  with the same message instead of waiting for a partner that left; the step's other
  host-side agreements ride on that one collective;
- verdicts that gate a step without branching (a non-finite per-sample loss on one
  rank) are agreed on the device by :func:`true_on_every_rank`.

Outside a process group every helper is the identity (one process, world size 1), so
the single-device path runs the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Params = dict[str, Tensor]
T = TypeVar("T")


def world_size() -> int:
    """The number of processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_rank_zero() -> bool:
    """Whether this process is global rank zero, the only one that writes files."""
    return rank() == 0


def effective_batch_size(local_batch_size: int) -> int:
    """``W |B_r|``: under DDP a sample on this rank moves the parameters by ``eta / (W |B_r|) G_i``.

    DDP averages the ranks' mean gradients, so with equal shards this is the global
    batch size ``|B|``; with unequal shards it is still each sample's exact share.

    Example::

        >>> effective_batch_size(8)  # no process group: one process
        8
    """
    return world_size() * local_batch_size


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def sum_over_ranks(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Elementwise sums over ranks, as new tensors (one collective for all of them, grouped by dtype).

    The inputs are left untouched, so a rank keeps its own shard's values after a write.

    Example::

        >>> sum_over_ranks({"a": torch.ones(2)})["a"]
        tensor([1., 1.])
    """
    if world_size() == 1:
        return {name: t.clone() for name, t in tensors.items()}
    out: dict[str, Tensor] = {}
    by_dtype: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault((t.dtype, t.device), []).append(name)
    # A fixed order (sorted dtype names) so every rank issues the same collectives.
    for key in sorted(by_dtype, key=lambda k: (str(k[0]), str(k[1]))):
        names = by_dtype[key]
        flat = _flat([tensors[n].detach() for n in names]).clone()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out.update(zip(names, _unflat(flat, [tensors[n] for n in names])))
    return {name: out[name] for name in tensors}


def mean_over_ranks(params: Params) -> Params:
    """The mean over ranks of a parameter-shaped dict, as DDP averages ``.grad`` (identity in one process)."""
    if world_size() == 1:
        return dict(params)
    size = world_size()
    return {name: t / size for name, t in sum_over_ranks(params).items()}


def sum_scalars_over_ranks(values: Sequence[float]) -> list[float]:
    """Sums over ranks of a few Python numbers (float64, one collective)."""
    if world_size() == 1:
        return [float(v) for v in values]
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.tolist()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_indices(indices: Sequence[int] | range, *, rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's share ``indices[rank::W]`` of a list every rank holds in the same order.

    Example::

        >>> shard_indices(range(5), rank_=1, world=2)
        [1, 3]
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(indices[r::w])


def shard_batches(batches: Iterable[T], *, rank_: int | None = None, world: int | None = None) -> Iterator[T]:
    """Every ``W``-th batch starting at this rank's (for loaders that cannot be sharded by sample).

    Example::

        >>> list(shard_batches("abcde", rank_=0, world=2))
        ['a', 'c', 'e']
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    for position, batch in enumerate(batches):
        if position % w == r:
            yield batch


def sum_with_count_over_ranks(total: Params | None, count: int, like: Params) -> tuple[Params, int]:
    """Add every rank's summed gradient and sample count (one collective), so a mean is taken once.

    Args:
        total: this rank's summed gradient over its shard (``None`` if its shard was empty).
        count: the number of samples in this rank's shard.
        like: a parameter dict of the right shapes and device (for an empty shard).

    Each rank sums over its shard of a target set or of the training set; dividing the
    result's sum by its count gives the same mean a single process computes over all the
    batches (up to the order of float additions).

    Example::

        >>> total, count = sum_with_count_over_ranks({"w": torch.ones(2)}, 4, {"w": torch.zeros(2)})
        >>> total["w"] / count
        tensor([0.2500, 0.2500])
    """
    if total is None:
        total = {k: torch.zeros_like(v) for k, v in like.items()}
    if world_size() == 1:
        return total, count
    device = next(iter(total.values())).device
    counted = {"__count__": torch.tensor([float(count)], dtype=torch.float64, device=device)}
    reduced = sum_over_ranks({**total, **counted})
    count = int(reduced.pop("__count__").item())
    return reduced, count


def unsupported_strategy_message(strategy: Any, world_size_: int) -> str | None:
    """Why the callback cannot run under a Lightning ``strategy``, or ``None`` where it can.

    DDP (``strategy="ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``) keeps a whole
    copy of the parameters on every rank, so every rank can evaluate the model at the step's
    points; sharded strategies (FSDP, DeepSpeed, model parallel) split the parameters and are
    refused.

    Example::

        >>> from lightning.pytorch.strategies import FSDPStrategy
        >>> print(unsupported_strategy_message(FSDPStrategy(), 2).split(";")[0])
        DiffInCallback supports one device (SingleDeviceStrategy) and DDP (strategy='ddp', 'ddp_spawn', 'ddp_fork' or 'ddp_notebook')
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    supported = isinstance(strategy, SingleDeviceStrategy) and world_size_ == 1
    # DeepSpeedStrategy subclasses DDPStrategy but shards parameters and optimizer state.
    supported = supported or (isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy))
    if supported:
        return None
    return (
        "DiffInCallback supports one device (SingleDeviceStrategy) and DDP (strategy='ddp', 'ddp_spawn', "
        f"'ddp_fork' or 'ddp_notebook'); got strategy {type(strategy).__name__} with world_size={world_size_}. "
        "Sharded strategies (FSDP, DeepSpeed, model parallel) split the parameters, which the callback's extra "
        "passes need whole on every rank: train with Trainer(strategy='ddp', devices=k) or with devices=1."
    )


class RankFailure(RuntimeError):
    """Raised on every rank when one or more ranks failed a check; names each failing rank and its message."""


def raise_if_any_rank_failed(error: BaseException | None, every_rank: Sequence[bool] = ()) -> list[bool]:
    """Raise on every rank if any rank passes an error; return on every rank otherwise.

    Every rank must call it at the same point (it is a collective), with as many
    ``every_rank`` flags. The common case costs one all-reduce of a few numbers; only
    when a rank failed are the messages gathered, so each rank raises the same
    :class:`RankFailure` naming them all. A rank's own error is chained as the cause.

    Returns, for each of ``every_rank``, whether every rank passed True: the ranks' other
    agreements ride on the same collective (a step's agreement waits on the host once).

    Example::

        >>> raise_if_any_rank_failed(None)  # one process, nothing failed
        []
        >>> raise_if_any_rank_failed(None, [True, False])
        [True, False]
        >>> raise_if_any_rank_failed(ValueError("bad ids"))
        Traceback (most recent call last):
        ...
        ValueError: bad ids
    """
    if world_size() == 1:
        if error is not None:
            raise error
        return [bool(flag) for flag in every_rank]
    sums = sum_scalars_over_ranks([0.0 if error is None else 1.0, *(float(bool(flag)) for flag in every_rank)])
    if sums[0] == 0:
        return [total == world_size() for total in sums[1:]]
    messages: list[Any] = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    summary = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    raise RankFailure(f"DiffInCallback stopped the run on every rank because {summary}") from error


def true_on_every_rank(flag: Tensor) -> Tensor:
    """A boolean on the device: True where ``flag`` is True on every rank (nothing read back to the host).

    A device collective: on a GPU it is queued like a kernel, so a verdict that gates the
    step (a NaN per-sample loss on one rank skips the step on all) costs no host wait.
    Every rank must call it at the same point.

    Example::

        >>> true_on_every_rank(torch.tensor(True))  # one process: the flag itself
        tensor(True)
    """
    if world_size() == 1:
        return flag
    # An integer MIN (gloo and NCCL both reduce int32; NCCL has no boolean reduction).
    reduced = flag.to(torch.int32)
    dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
    return reduced.bool()


__all__ = [
    "RankFailure",
    "effective_batch_size",
    "is_rank_zero",
    "mean_over_ranks",
    "rank",
    "raise_if_any_rank_failed",
    "shard_batches",
    "shard_indices",
    "sum_with_count_over_ranks",
    "sum_over_ranks",
    "sum_scalars_over_ranks",
    "true_on_every_rank",
    "unsupported_strategy_message",
    "world_size",
]
