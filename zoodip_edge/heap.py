"""glibc's allocator, where the process has one: both stages hand freed memory back to the OS with it.

Loading a U-Net session frees ~0.4 GB of parse buffers that glibc keeps mapped once other sessions
sit below them on the heap (docs/performance.md, "Where the remaining memory is"); an export that
has freed a quantized graph kept 1.4 of the SD1.5 U-Net's 1.6 GB resident until ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _glibc()


def return_free_memory() -> None:
    """Hand memory that is free but still mapped back to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
