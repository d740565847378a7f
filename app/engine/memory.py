"""Give decoded-pixel memory back to the OS after large images.

glibc keeps freed memory in its arenas (one per decode thread): after a 40 MP PNG the process
would hold hundreds of MB it no longer uses. ``malloc_trim`` returns it; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# Decodes smaller than this leave little behind; trimming after each would only cost time.
TRIM_ABOVE_PIXELS = 4_000_000


def _load_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_trim()


def release_after(pixels: int) -> None:
    if _malloc_trim is not None and pixels > TRIM_ABOVE_PIXELS:
        _malloc_trim(0)
