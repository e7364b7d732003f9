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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
# How often a lean visit hands free heap pages back (`returning_freed_memory`): on a replayed
# deployed SmolLM2 visit (2026-12-07), 0.05, 0.1 and 0.2 s gave the same peak (583, 580, 589 MB);
# a shorter period costs more step time (24.1, 23.1, 21.4 s a visit).
TRIM_PERIOD_S = 0.1


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


def process_peak_bytes() -> int:
    """The largest resident set this process has had in its life (host memory, any device)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextmanager
def returning_freed_memory(enabled: bool = True, period_s: float = TRIM_PERIOD_S) -> Iterator[bool]:
    """While the block runs, hand the heap's free pages back to the system every `period_s`
    (glibc's `malloc_trim`): a lower peak for a memory-bound node, for some step time. Yields
    False (and does nothing) when not `enabled` or where the C library is not glibc.

    glibc keeps freed heap memory resident, and a step's tensors of many sizes (batches padded
    to their longest example) leave the heap fragmented: a deployed visit held 417 MB of free heap
    between steps. Mapping large blocks on their own (mallopt's mmap threshold) returns only
    what lies above the threshold; trimming returns free pages wherever they are.
    """
    trim = _malloc_trim() if enabled else None
    if trim is None:
        yield False
        return
    stop = threading.Event()

    def trim_until_stopped() -> None:
        while not stop.wait(period_s):
            trim(0)

    thread = threading.Thread(target=trim_until_stopped, daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()


def baseline_bytes(device: torch.device) -> int:
    """Memory in use before a piece of work starts, to subtract from its peak.

    On CPU the process may hold memory freed by earlier work (and, in-process, the server's
    state): collect garbage and hand free heap pages back to the OS first, so the peak minus
    this baseline is what the work itself needed.
    """
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:  # elsewhere than glibc the baseline is a little high
        trim(0)
    return current_rss_bytes()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library is not glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


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
