"""Keep freed tensor memory in the process instead of handing it back to the kernel after every step.

A batched step allocates and frees the same few MB of activations, gradients and Adam temporaries every
time. glibc's malloc serves blocks above its mmap threshold (dynamic, from 128 KB) with a fresh mmap and
unmaps them on free, and trims the heap's top once more than twice that is free, so every step faults the
same pages in again (measured at K = 64 clients: ~2,000 minor faults and 2.6 ms of kernel time in a 10 ms
step; the Adam update alone 6.5 -> 4.6 ms). Raising both thresholds once per process ends that. The cost:
up to ``TRIM_THRESHOLD`` of freed memory stays with the process for reuse (peak memory is unchanged).
Only glibc has ``mallopt``; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for it on 64-bit: larger blocks are still mmapped
TRIM_THRESHOLD = 128 << 20

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True where that took effect."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)  # the process's own C library, already loaded
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # musl and other C libraries without mallopt
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
