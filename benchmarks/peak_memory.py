"""Peak memory of one region of code above the level at its start, on CPU or CUDA.

On CPU the figure is the resident set size (RSS), read two ways:

- ``sampled``: /proc/self/statm read every ``interval`` seconds by a thread (may miss a spike
  shorter than the interval);
- ``kernel``: the kernel's own high-water mark of this process's memory, ``VmHWM`` in
  /proc/self/status, reset to the current RSS at entry by writing ``5`` to /proc/self/clear_refs
  (exact, but only valid where that reset is allowed; ``None`` otherwise). Not
  ``getrusage(RUSAGE_SELF).ru_maxrss``: that is the larger of VmHWM and a per-process maximum
  that the kernel raises at exec to the RSS of the parent that spawned it, and whenever a thread
  exits, and that clear_refs cannot reset. A fit spawned from an 860 MB pytest process read an
  ru_maxrss of 860 MB before and after, whatever it allocated.

Before the baseline is read, garbage is collected and glibc's ``malloc_trim(0)`` hands freed
heap pages back to the kernel: otherwise memory freed by earlier work in the process stays
resident, is reused by the measured region without growing the RSS, and the region looks free.

On CUDA the figure is ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()``
at entry (tensors only; the caching allocator's reserve is not counted).

Example::

    >>> import torch
    >>> with PeakMemory("cpu") as memory:
    ...     block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
    ...     del block
    >>> memory.sampled >= 0
    True
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from typing import Any, Literal

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """The process's current resident set size in bytes (second field of /proc/self/statm)."""
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * _PAGE


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the kernel (glibc only; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident; the baseline is then loose
        pass


def reset_kernel_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def kernel_peak_bytes() -> int:
    """The kernel's high-water mark of the resident set, ``VmHWM`` in /proc/self/status, in bytes."""
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError("/proc/self/status has no VmHWM line: not a Linux kernel; the kernel peak is unavailable here.")


class PeakMemory:
    """Context manager: peak memory of its body above the level at entry, in bytes.

    Args:
        device: ``"cpu"`` (resident set size) or ``"cuda"`` (tensor memory on the current device).
        interval: seconds between two RSS samples on CPU.
        limit_bytes: on CPU, end the process (exit status 75, message on stderr) once the RSS
            grows by more than this above the baseline: a runaway benchmark must not take the
            shared machine down. ``None``: no limit.

    After exit: ``baseline`` (bytes at entry), ``sampled`` (peak growth, sampled; on CUDA the
    allocator's exact peak growth) and ``kernel`` (peak growth by the kernel's VmHWM on CPU,
    ``None`` where its reset is not allowed or on CUDA).
    """

    EXIT_STATUS_OVER_LIMIT = 75

    def __init__(self, device: Literal["cpu", "cuda"] | str = "cpu", interval: float = 0.002, limit_bytes: int | None = None) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"`device` must be 'cpu' or 'cuda'; got {device!r}. Use 'cuda' for a GPU run, 'cpu' otherwise.")
        if not interval > 0:
            raise ValueError(f"`interval` must be a positive number of seconds; got {interval!r}.")
        self.device, self.interval, self.limit_bytes = device, interval, limit_bytes
        self.baseline = 0
        self.sampled = 0
        self.kernel: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            release_freed_memory()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        release_freed_memory()
        self._kernel_reset = reset_kernel_peak()
        self.baseline = resident_bytes()
        self._max = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, resident_bytes())
            if self.limit_bytes is not None and self._max - self.baseline > self.limit_bytes:
                print(
                    f"PeakMemory: the resident set grew by {(self._max - self.baseline) / 2**20:.0f} MiB, over the limit "
                    f"`limit_bytes`={self.limit_bytes / 2**20:.0f} MiB; ending the process so that the machine survives. "
                    "Raise the limit if that much is expected.",
                    file=sys.stderr, flush=True,
                )
                os._exit(self.EXIT_STATUS_OVER_LIMIT)

    def so_far(self) -> int:
        """Peak growth up to now, inside the region (CPU: the larger of the samples and VmHWM)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        peak = max(self._max, resident_bytes())
        if self._kernel_reset:
            peak = max(peak, kernel_peak_bytes())
        return peak - self.baseline

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.sampled = torch.cuda.max_memory_allocated() - self.baseline
            return
        kernel = kernel_peak_bytes() if self._kernel_reset else 0
        self._stop.set()
        self._thread.join()
        self.sampled = max(self._max, resident_bytes()) - self.baseline
        self.kernel = kernel - self.baseline if self._kernel_reset else None
