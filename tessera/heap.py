"""Handing freed heap memory back to the OS while a model loads (under a weight budget, or quantized).

glibc's malloc serves blocks below its mmap threshold from the heap, and raises that threshold (up to 32
MiB) each time a larger mapped block is freed; freed heap blocks then stay in the resident set until
reused. Loading reads, quantizes and tiles a layer's tensors one after another, so those freed
transients pile up: on the test model of tests/offload/test_resident_memory.py (16 MiB fp32 layers) the
resident set grew by ~12 MiB of freed blocks per layer. `trim_heap` (malloc_trim) returns the free pages
at each layer boundary, so the resident set follows what is alive. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim(0); a few ms on a large heap)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
