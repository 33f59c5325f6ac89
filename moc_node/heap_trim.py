"""Hand the C heap's free pages back to the OS now and then (glibc's `malloc_trim`).

Found with bench/fuzz.py: after its HTTP phase the node's main glibc arena held 2-3 MB more
free memory than before, resident, while the memory in use (mallinfo2) and Python's objects
(tracemalloc) grew by ~100 KiB. glibc raises its mmap threshold to the size of the first
mmapped buffer freed (up to 32 MiB), so later large buffers (here 128-512 KiB: a fixed 128 KiB
threshold removed the growth, a fixed 512 KiB one did not) come from the main heap, and the
holes they leave below live chunks are never trimmed from its top. RSS then shows more than
the node uses, to the operator and to a container's memory limit. `malloc_trim(0)` releases
every free page of every arena: 0.2-1.2 ms on a ~75 MB node (measured), on a ticker thread
(ctypes drops the GIL) every TRIM_INTERVAL_S. A fixed mmap threshold would instead cost every
`msgpack.packb` (a 256 KiB buffer) an mmap and munmap: 8 us instead of 0.7 (measured).

Elsewhere (musl, macOS: no `malloc_trim`) there is nothing to call and no ticker.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

TRIM_INTERVAL_S = 10.0
"""Often enough that a burst's freed buffers leave RSS within seconds (at 30 s the full fuzz run
still read +6.5%, swinging ~2 MB between trims); at <= 1.2 ms a call that is 0.01% of a thread."""


def heap_trimmer() -> Callable[[], None] | None:
    """Return a call that hands glibc's free heap pages back to the OS, or None without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def run() -> None:
        trim(0)

    return run
