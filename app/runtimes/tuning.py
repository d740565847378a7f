"""The tuning cache: what ``auto`` timed (app.runtimes.registry), kept on disk and reused, so that
replicas of one model on one kind of CPU serve alike and start sooner (docs/backends.md).

Timings on shared cores are noisy: two replicas timing at once chose different runtimes for one
file. An entry is keyed by everything that decides the timings: the content of the model files
the candidates read (sha256: size and mtime differ between two copies of one file, and agree
between two different files written in one second), the CPU (model, family and the vector flags
the kernels choose by), each runtime's version, the lanes and threads, the candidates and the
batch sizes timed. Any change is another key, so another entry: nothing is ever reused out of
its context. The reference check is not cached: it runs at every load.

One JSON file per key, written whole beside and renamed over (``os.replace``), so a reader sees
an old entry or the new one, never half of one; a lock file per key (``flock``) makes the
workers and replicas that start at once wait for the first one's timings instead of timing on
each other's cores. A directory that cannot be used is logged, and the model is timed and
served as without a cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when an entry's layout or meaning changes: old entries are then misses
# The CPU flags that decide which kernels the runtimes run (and so their speed), as
# /proc/cpuinfo names them.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
# tuning=retime reuses only what was timed since this process started: its workers, which
# start at once, wait for one timing and share it; the next start times again.
STARTED = time.time()

# Each candidate ("onnxruntime fp32") -> its images per second by batch size, or why it failed.
Timings = dict[str, dict[int, float] | str]


def key(
    files: Iterable[Path],
    runtimes: dict[str, str],
    threads: dict[str, Any],
    candidates: Iterable[str],
    batch_sizes: Iterable[int],
) -> dict[str, Any]:
    """What decides the timings; ``runtimes``: each candidate runtime's version."""
    return {
        "format": FORMAT,
        "files": sorted(file_digest(path) for path in set(files)),
        "cpu": cpu(),
        "runtimes": dict(sorted(runtimes.items())),
        "threads": threads,
        "candidates": sorted(candidates),
        "batch_sizes": sorted(batch_sizes),
    }


def file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def cpu() -> dict[str, Any]:
    """This CPU as the runtimes see it: its model, and which of ``CPU_FLAGS`` it has."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor's block says it for all
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:  # not Linux
        return {"model": platform.processor() or platform.machine(), "flags": []}
    model = " ".join(fields.get(f, "") for f in ("vendor_id", "cpu family", "model", "stepping"))
    flags = set(fields.get("flags", "").split())
    return {
        "model": f"{fields.get('model name', platform.machine())} ({model.strip()})",
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
    }


def entry_path(directory: Path, entry_key: dict[str, Any]) -> Path:
    text = json.dumps(entry_key, sort_keys=True)
    return directory / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


@contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold ``path``'s lock (created with its directory) while the body runs; whether the
    directory can be written (False: logged; an entry may still be read from it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.warning(
            "tuning cache not writable", extra={"path": str(path.parent), "error": str(exc)}
        )
        yield False
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the holder exits, however
        except OSError as exc:  # a filesystem without locks: each times, the writes stay whole
            log.warning("tuning cache not locked", extra={"path": str(path), "error": str(exc)})
        yield True
    finally:
        os.close(descriptor)


def load(path: Path, entry_key: dict[str, Any], *, since: float = 0.0) -> Timings | None:
    """The timings stored under ``entry_key`` at ``since`` or later, or None."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("tuning cache entry unreadable", extra={"path": str(path), "error": str(exc)})
        return None
    if not isinstance(stored, dict) or stored.get("key") != entry_key:
        return None  # another layout, or (vanishingly) another key with this name
    if stored.get("timed_at", 0) < since:
        return None
    return {
        name: value if isinstance(value, str) else {int(s): float(v) for s, v in value.items()}
        for name, value in stored["timings"].items()
    }


def store(path: Path, entry_key: dict[str, Any], timings: Timings) -> None:
    """Write the entry whole beside ``path``, then rename it over: logged when it cannot be."""
    entry = {"key": entry_key, "timed_at": time.time(), "timings": timings}
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    except OSError as exc:
        log.warning("tuning cache not written", extra={"path": str(path), "error": str(exc)})
        return
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(entry, file, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as exc:  # a full disk
        log.warning("tuning cache not written", extra={"path": str(path), "error": str(exc)})
        with suppress(OSError):
            os.unlink(temporary)
        return
    log.info("backend timings stored", extra={"path": str(path)})
