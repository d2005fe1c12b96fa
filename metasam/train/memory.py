"""Keep freed heap memory inside the process (glibc), so CPU training stops paying page faults.

A CPU meta-training step allocates and frees the same large activation buffers for every task (a
Conv4's first block on 75 query images holds 15 MB per tensor). glibc serves blocks that size with
``mmap`` and unmaps them on free, or trims the heap top, so the next task gets fresh pages from the
kernel and pays a page fault per page to have each zeroed again. :func:`retain_freed_memory` sets
``M_MMAP_MAX = 0`` and a 2 GiB ``M_TRIM_THRESHOLD``: blocks come from the heap and freed ones stay
there for reuse. In two runs of ``metasam train`` at 5-way 1-shot (docs/results/allocator.md) the page
faults per task fell from 3,411 to 1,114 and from 11,004 to 902, the system time per task from 11.1 to 4.6
and from 28.1 to 3.5 ms, and training ran 1.12× and 1.22× faster (medians of three rounds). The price is
memory: the process keeps its peak heap until it exits, and the heap fragments (the peak memory of each
implementation with it: docs/results/throughput-retain.md).

``metasam`` commands call it at start-up (``METASAM_RETAIN_FREED_MEMORY=0`` opts out); library users
who want it call it once, early, themselves. It is a process-wide allocator setting: it changes no
number a run computes.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB, the largest it accepts


def retain_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_MAX = 0`` and ``M_TRIM_THRESHOLD = 2 GiB`` for this process.

    Returns True when applied; False where the C library is not glibc (macOS, Windows, musl), where
    there is nothing to do, or when ``METASAM_RETAIN_FREED_MEMORY=0`` is set.
    """
    if os.environ.get("METASAM_RETAIN_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
