"""The widest floating-point dtype a device computes in.

Sums, norms and checks that must not lose precision run in float64 on the device that holds
the tensors (no copy to the host, which would wait). Apple's MPS has no float64: a float64
tensor there raises at its creation, so those quantities use float32 on MPS instead, the
rule the accumulators follow too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def widest_float(device: torch.device | str) -> torch.dtype:
    """float64, or float32 on a device without float64 (MPS).

    >>> widest_float("cpu"), widest_float("mps")
    (torch.float64, torch.float32)
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def widened(tensor: Tensor) -> Tensor:
    """``tensor`` in :func:`widest_float` of its device (a no-op where it already is)."""
    return tensor.to(widest_float(tensor.device))
