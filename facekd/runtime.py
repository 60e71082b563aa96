"""Process-wide settings that the CLI applies at start-up (the library never applies them itself)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 1 GiB for reuse instead of returning them to the OS.

    CPU inference and training allocate and free the same large activation buffers every batch;
    with glibc's defaults each one is a fresh mmap whose pages fault in again, which made batch-64
    CNN throughput on CPU up to 2× slower than batch 1 here. The price is that the process keeps
    its peak heap. Returns whether the setting was applied (glibc only; elsewhere a no-op)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False
