"""Keeping the resident set flat over thousands of blocks.

glibc keeps memory freed by a task in its per-thread arenas; with buffers of tens of MB allocated
and freed per block (raw block, probabilities, decoded chunks), fragmentation lets the resident set
creep up with the number of blocks done, i.e. with the volume. ``malloc_trim`` at the end of each
block task hands the free pages back at no measurable cost in time (it touches only free memory);
fixing the mmap threshold instead (``MALLOC_MMAP_THRESHOLD_``) kept memory as flat but made every
large torch temporary an mmap zero-filled anew. The figures are in ``benchmarks/README.md``
("Decisions backed by measurements", ``bench_predict.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys
from typing import Any

__all__ = ["peak_rss_mb", "trim_memory"]


@functools.lru_cache(maxsize=1)
def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


def trim_memory() -> None:
    """Return the allocator's free memory to the operating system (glibc; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident set so far, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)
