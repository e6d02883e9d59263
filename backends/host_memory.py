"""glibc's malloc, set for a training loop on the CPU (both backends' CPU paths).

glibc gives freed memory back to the kernel: a block of 32 MiB or more is a mapping of its
own, unmapped when freed, and the free top of the heap is trimmed once it passes a
threshold that starts at 128 KiB. A training step frees its activations at the end and
forms them again in the next, so every step paid one page fault per 4 KiB page it wrote
first (150-200 K faults per step at bench_train's shape on torch, ~6 % of its time; 14-98 K
on MLX, whose CPU buffers come from malloc too: none with this). Fixing the mapping
threshold at its ceiling (32 MiB; glibc adapts it up to there anyway) and the trim
threshold at its own (2 GiB) keeps what a step freed for the next one. The resident set
stays at what the process already reached, which is the peak a run reports anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_CEILING = 32 * 1024 * 1024  # the most glibc takes on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_CEILING = 2**31 - 1  # mallopt takes an int: 2 GiB of free top kept at most

_done = False


def keep_freed_memory() -> bool:
    """Keep freed heap memory in the process (see the module docstring). True when glibc
    took the settings; False elsewhere (macOS, musl), where nothing changes."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_CEILING)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_CEILING))
    return _done
