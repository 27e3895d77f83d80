"""Process-wide memory settings graphopt's numpy work relies on."""

from __future__ import annotations

import ctypes
import os
import sys

#: Allocations up to this size come from the heap, where freed blocks are reused (see below).
HEAP_LIMIT_BYTES = 64 * 2**20
_malloc_tuned: bool | None = None


def reuse_freed_memory() -> bool:
    """Makes glibc reuse freed memory for intermediates instead of mapping fresh pages.

    The cpu backend (at compile) and the quantize pass (its 1 MiB tiles) turn it on. A decode
    step allocates and frees intermediates of hundreds of KiB to a few MiB every call.
    glibc serves allocations above its mmap threshold (128 KiB until a larger block is freed)
    with new mappings whose pages fault in, zeroed, on first touch: measured 23.2 vs 20.8 ms per
    decode step of the 155 M Llama when its weights were read in place (nothing large freed
    before). Raising the threshold keeps them on the heap. Process-wide, once; glibc only;
    ``GRAPHOPT_KEEP_MALLOC=1`` leaves the allocator alone. Returns whether it is in effect.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if os.environ.get("GRAPHOPT_KEEP_MALLOC") != "1" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3
                _malloc_tuned = bool(libc.mallopt(m_mmap_threshold, HEAP_LIMIT_BYTES)) and \
                    bool(libc.mallopt(m_trim_threshold, 2 * HEAP_LIMIT_BYTES))
            except (OSError, AttributeError):  # not glibc (musl, ...)
                _malloc_tuned = False
    return _malloc_tuned
