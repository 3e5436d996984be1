"""Whether tensors hold only finite numbers, at the cost of one sum per tensor (on CUDA one fused norm per dtype).

``torch.isfinite(t).all()`` writes a boolean tensor as large as ``t`` and reduces it: on the
256-1024-1024-10 MLP the per-step checks of the parameters and the batch gradient took 1.1 ms
(8% of a plain training step). A sum is about 20x cheaper and is finite whenever every element
is (a NaN or an infinity makes it NaN or infinite). A non-finite sum can also come from large
finite values overflowing, so only then the exact elementwise test decides. On CUDA the sums of
absolute values of a whole list come from one foreach norm per dtype (see ``_float32_sums``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _checkable(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The non-empty tensors, complex ones as their real and imaginary parts."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors if t.numel()]


def _float32_sums(tensors: list[Tensor], fused: bool | None = None) -> Tensor:
    """One float32 number per floating tensor, finite when every element is: a sum, or the fused sums of absolute values.

    float32 (half-precision sums overflow easily; MPS has no float64); integer tensors are
    finite and left out. Under no_grad rather than a detach per tensor: one operation fewer per
    tensor, every step. ``fused`` (default: on CUDA) takes ``torch._foreach_norm(ord=1)`` per
    dtype: on a GPU a small model's step is bound by the operations issued, and the foreach
    norm is one launch per list where the sums are one per tensor; on the CPU it is 4x slower
    than the sums (2.9 ms against 0.7 ms for the 256-1024-1024-10 MLP's parameters and
    gradients), so the CPU keeps the sums. Either overflows only beyond float32's range.
    """
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.zeros(0, dtype=torch.float32, device=tensors[0].device if tensors else None)
    if fused is None:
        fused = all(t.is_cuda for t in floats)
    with torch.no_grad():
        if fused:
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for t in floats:
                by_dtype.setdefault(t.dtype, []).append(t)
            parts = []
            try:
                for dtype, group in by_dtype.items():
                    # (vector_norm refuses a dtype narrower than its input's: float64 is summed in float64, then narrowed)
                    norms = torch._foreach_norm(group, 1, dtype=torch.float32) if torch.finfo(dtype).bits <= 32 else torch._foreach_norm(group, 1)
                    parts.append(torch.stack(norms).to(torch.float32))
            except TypeError:  # torch < 2.4: _foreach_norm takes no dtype; the sums below
                parts = []
            if parts:
                return parts[0] if len(parts) == 1 else torch.cat(parts)
        return torch.stack([t.sum(dtype=torch.float32) for t in floats])


def finite_flag(tensors: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """A boolean scalar on the tensors' device: every element finite. Reads nothing back to the host.

    For the per-step path, where a read back would stall a GPU every step: the caller gates
    what it adds with the flag instead of branching on it. Unlike :func:`all_finite` it has no
    exact second test, so a finite tensor whose float32 sum overflows (beyond 3.4e38) reads as
    non-finite; such values would overflow the step's products as well. ``device`` is the
    flag's device where there are no tensors (``True`` then).

    Example::

        >>> finite_flag([torch.ones(3), torch.tensor([1.0, float("inf")])])
        tensor(False)
    """
    tensors = _checkable(tensors)
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(_float32_sums(tensors)).all()


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """``True`` when every element of every tensor is finite (one host synchronisation; ``True`` for none).

    Example::

        >>> all_finite([torch.ones(3), torch.full((2,), 3e38)])  # the sum overflows, the values do not
        True
        >>> all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        False
    """
    tensors = _checkable(tensors)
    if not tensors:
        return True
    if bool(torch.isfinite(_float32_sums(tensors)).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
