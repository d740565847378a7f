"""Where a batch computes: on one of the inference threads ("lanes"), or inline on the event loop.

Lanes, like Triton's instance count: each computes one batch at a time. The batcher takes a free
lane before it collects a batch, so an idle model runs what is queued now and batches grow while
every lane is busy. Warm-up uses the same threads: on a GPU each lane owns its bound buffers and
CUDA graphs (app.runtimes.onnxruntime), so only that thread may warm them.

Inline (``Inline``), the lone-request fast path: work a request alone on the server does on the
event loop.

A request with the server to itself (nothing else admitted, queued or computing:
``Batcher.alone``) pays two thread hand-offs for nothing: to a decode thread and back, to an
inference lane and back. Where the work is known to be short, it runs on the loop instead, which
then stalls that long (benchmarks/results/lanes.md). One setting, ``inline_max_ms``, bounds both
halves, each predicted from what the same work cost last time:

- **decode**: the image's pixels (from its header) at the last decode's seconds per pixel;
- **batch**: the lone batch's last run of the same bucket. This half needs the session that
  spins for lone batches (``ort_spinning=adaptive`` on the CPU, with more than one thread for it:
  app.runtimes.onnxruntime), since a lone batch on a session that never spins is slow to wake
  anyway;
  elsewhere a lone batch runs on a lane like any other.

``inline_max_ms=0`` turns both off.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Lanes:
    def __init__(self, count: int) -> None:
        """Create inside the running loop (the free-lane queue belongs to it)."""
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inference_{lane}")
            for lane in range(count)
        ]
        self._free: asyncio.Queue[ThreadPoolExecutor] = asyncio.Queue()
        for lane in self._threads:
            self._free.put_nowait(lane)

    def __len__(self) -> int:
        return len(self._threads)

    async def take(self) -> ThreadPoolExecutor:
        """A free lane; waits while every lane computes. Give it back with ``give_back``."""
        return await self._free.get()

    def give_back(self, lane: ThreadPoolExecutor) -> None:
        self._free.put_nowait(lane)

    @property
    def first(self) -> ThreadPoolExecutor:
        return self._threads[0]

    async def run(self, lane: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(lane, fn, *args)

    async def run_on_each(self, work: Sequence[Callable[[], T]], at_once: bool) -> list[T]:
        """Run ``work[i]`` on lane i: all at once, or one lane after another."""
        runs = (self.run(lane, fn) for lane, fn in zip(self._threads, work, strict=True))
        if at_once:
            return list(await asyncio.gather(*runs))
        return [await run for run in runs]

    def shutdown(self) -> None:
        for lane in self._threads:
            lane.shutdown(wait=True)


class Inline:
    def __init__(self, max_ms: float, batches: bool) -> None:
        """``batches``: whether lone batches may run inline (there is a lone-batch session)."""
        self.max_ms = max_ms
        self.batches = batches and max_ms > 0
        self._seconds_per_pixel: float | None = None  # of the last decode
        self._batch_seconds: dict[int, float] = {}  # of the last lone batch, by bucket

    def decoded(self, pixels: int, seconds: float) -> None:
        self._seconds_per_pixel = seconds / max(pixels, 1)

    def decodes(self, pixels: int) -> bool:
        """Whether an image of ``pixels`` decodes on the loop (its request being alone)."""
        rate = self._seconds_per_pixel
        return bool(self.max_ms) and rate is not None and pixels * rate * 1000 < self.max_ms

    def ran_batch(self, bucket: int, seconds: float) -> None:
        self._batch_seconds[bucket] = seconds

    def runs_batch(self, bucket: int) -> bool:
        """Whether a lone batch of ``bucket`` runs on the loop."""
        last = self._batch_seconds.get(bucket, math.inf)
        return self.batches and last * 1000 < self.max_ms

    def describe(self) -> dict[str, float | bool]:
        return {"inline_max_ms": self.max_ms, "decode": bool(self.max_ms), "batch": self.batches}
