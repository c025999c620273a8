"""glibc's malloc on a Dask worker: large arrays kept in the heap, as glibc keeps them by default.

Dask's nanny starts every worker with `MALLOC_TRIM_THRESHOLD_=65536` (its config
`distributed.nanny.pre-spawn-environ`), so that freed memory goes back to the system.
Setting one threshold turns off glibc's adjustment of the other: the mmap threshold stays
at 128 KiB, and every array above it is a fresh `mmap`, its pages faulted in one by one,
then unmapped when freed. A `match` over 100k profiles allocates about 20 MB of such
arrays per task: 5,000 page faults and 12 ms of system time, where its computation takes
7 ms (bench/dask_scaling.py). Any numpy-heavy kind pays the same on Dask, and nowhere
else: the server's own process workers get glibc's defaults.

So the first task in a worker process sets both thresholds to the ceilings glibc's own
adjustment reaches on 64-bit (32 MiB for mmap, twice that for trimming), but only where
the trim threshold came pinned from the environment and the mmap one did not: a cluster
that sets `MALLOC_MMAP_THRESHOLD_` keeps its choice. What a large build frees stays in
the heap, so `release_free_memory` hands it back after one (glibc's `malloc_trim`).
Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc sets beside a raised mmap threshold


def thresholds_pinned(environ: Mapping[str, str]) -> bool:
    """True where the trim threshold was set and the mmap threshold left to glibc, which
    then keeps it at 128 KiB (Dask's nanny sets only the first)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    trim_set = "MALLOC_TRIM_THRESHOLD_" in environ or "glibc.malloc.trim_threshold" in tunables
    mmap_set = "MALLOC_MMAP_THRESHOLD_" in environ or "glibc.malloc.mmap_threshold" in tunables
    return trim_set and not mmap_set


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):  # where CDLL(None) is the process's own libc
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def keep_large_allocations() -> bool:
    """Raise this process's thresholds if the environment pinned them (once; later calls
    return the first one's answer): True if they were raised."""
    libc = _glibc()
    if libc is None or not thresholds_pinned(os.environ):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_free_memory() -> None:
    """Give the system back what the heap holds free: after a large build, whatever the
    thresholds, since freed chunks below the heap's top are never trimmed by themselves."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
