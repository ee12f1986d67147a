"""A worker's own memory, for ``pool.max_rss_mb``: what it holds now, and where its growth counts from."""

from __future__ import annotations

import ctypes
import os
from typing import Any


def rss_bytes() -> int:
    """The worker's own resident memory: anonymous pages (statm's resident less shared).
    File-backed pages it inherited from a large parent are left out: the kernel may
    reclaim them at any time, which made the growth since boot look smaller than it was."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _find_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and other systems have none
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()  # looked up once in the parent, not in every new worker


def boot_rss() -> int:
    """The resident memory growth counts from, read once a worker has booted.

    Memory the parent had freed but C's allocator kept (resident, at no cost to anyone
    while it stays shared) is handed back first: otherwise the worker's own allocations
    reuse it, and tens of MiB of growth would show none in the resident count.  (A test
    process that had run large payloads lost the limit for two 25 MiB tasks this way.)
    Handing back is done once per worker, only when a limit is set: microseconds for a
    small heap, 5.6 ms for a 1 GB one with 500 MiB freed in 1 MiB pieces (measured)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
    return rss_bytes()
