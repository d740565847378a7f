"""Memory: give decoded-pixel memory back to the OS after large images, and keep a model load
inside the memory budget.

glibc keeps freed memory in its arenas (one per decode thread): after a 40 MP PNG the process
would hold hundreds of MB it no longer uses. ``malloc_trim`` returns it; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from core.errors import ModelError

# Decodes smaller than this leave little behind; trimming after each would only cost time (the
# pipeline calls ``release_all`` after a larger one).
TRIM_ABOVE_PIXELS = 4_000_000


def _load_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_trim()


def release_all() -> None:
    """Give every freed page back: after a model version's sessions are let go (its weights and
    arena are hundreds of MB that glibc would otherwise keep), and after a large decode."""
    if _malloc_trim is not None:
        _malloc_trim(0)


# Resident memory of one ONNX Runtime CPU session per byte of its model file: the weights, their
# prepacked copies and the arena: about 2.5x the file per session, measured for the 224x224 fp32
# ResNet-50 with one session and with the lone-batch session beside it (docs/repository.md).
SESSION_BYTES_PER_FILE_BYTE = 2.5


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def check_budget(budget_mib: int, file_bytes: int, sessions: int, what: str) -> None:
    """Refuse, with a clear error, a load that would take the process past ``budget_mib``:
    better a failed load, while the serving versions go on, than an OOM kill of all of them."""
    if not budget_mib:
        return
    needed = resident_bytes() + file_bytes * SESSION_BYTES_PER_FILE_BYTE * sessions
    if needed > budget_mib * 2**20:
        raise ModelError(
            f"loading {what} would need about {needed / 2**20:.0f} MiB resident (now "
            f"{resident_bytes() / 2**20:.0f} MiB, plus about {SESSION_BYTES_PER_FILE_BYTE:g}x its "
            f"{file_bytes / 2**20:.0f} MB file per session, {sessions} session(s)), over "
            f"memory_budget_mib={budget_mib}: unload a version first, or raise the budget"
        )
