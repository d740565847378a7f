"""The cores this process may count on, and each worker's own share of them."""

from __future__ import annotations

import math
import os
from pathlib import Path

# cgroup v2: "QUOTA PERIOD" or "max PERIOD"; Docker's --cpus and a Kubernetes CPU limit set it.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus() -> int:
    """Cores this process may count on: those it may run on (its affinity, so ``taskset`` and
    cpusets count), at most its CPU quota rounded up: in a container limited to 2 CPUs on a
    64-core node, 2, where ONNX Runtime's own count would start 64 threads to share them."""
    cores = len(os.sched_getaffinity(0))
    quota = _cpu_quota()
    return cores if quota is None else max(1, min(cores, quota))


def cpu_share(workers: int) -> int:
    """Cores each of ``workers`` processes may count on: the usable ones split evenly, at least
    one. A pinned worker counts the cores ``pin_worker`` gave it instead."""
    return max(1, usable_cpus() // workers)


def pin_worker(index: int, workers: int) -> list[int] | None:
    """Pin this process (every thread, and those it starts later) to the ``index``-th of
    ``workers`` equal slices of its cores; the cores, or None where it would not help: one
    worker, cores that do not divide evenly (a core would go idle), or a CPU quota (the
    affinity then lists cores the quota never lets us fill).

    A worker that stays on its cores keeps its caches and never waits behind another worker
    on the same core: two pinned workers serve more than two the kernel moves about
    (docs/workers.md, benchmarks/results/workers.md).
    """
    cores = sorted(os.sched_getaffinity(0))
    if workers == 1 or len(cores) % workers or _cpu_quota() is not None:
        return None
    share = len(cores) // workers
    mine = cores[index * share : (index + 1) * share]
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), mine)
    return mine


def _cpu_quota() -> int | None:
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return None
