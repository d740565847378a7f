"""Inference threads ("lanes"), like Triton's instance count: each computes one batch at a time.

The batcher takes a free lane before it collects a batch, so an idle model runs what is queued
now and batches grow while every lane is busy. Warm-up uses the same threads: on a GPU each lane
owns its bound buffers and CUDA graphs (app.engine.bound), so only that thread may warm them.
"""

from __future__ import annotations

import asyncio
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
