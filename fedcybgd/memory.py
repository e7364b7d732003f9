"""Peak memory of a stretch of work, measured (never estimated).

On CUDA: the allocator's peak. On CPU, where torch keeps no allocator statistics: the peak
resident set size of this process, sampled every few milliseconds while the work runs.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
# glibc's malloc raises its mmap threshold each time a large mapped block is freed (up to 32
# MiB), so after the first step most of a step's tensors come from the heap, where what is freed
# between live blocks stays resident. Fixed at 1 MiB, every tensor of 1 MiB or more is mapped on
# its own and returned when freed: measured in README "Memory of one client".
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_LEAN_MMAP_THRESHOLD = 1 << 20


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


def process_peak_bytes() -> int:
    """The largest resident set this process has had in its life (host memory, any device)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def return_freed_memory() -> bool:
    """From now on, have glibc map every block of 1 MiB or more on its own, so freeing it hands
    it back to the system: a lower peak for a memory-bound node, at some step time. False where
    the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _LEAN_MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def baseline_bytes(device: torch.device) -> int:
    """Memory in use before a piece of work starts, to subtract from its peak.

    On CPU the process may hold memory freed by earlier work (and, in-process, the server's
    state): collect garbage and hand free heap pages back to the OS first, so the peak minus
    this baseline is what the work itself needed.
    """
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is then a little high
        pass
    return current_rss_bytes()


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.bytes = max(self.bytes, current_rss_bytes())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.bytes = max(self.bytes, current_rss_bytes())
