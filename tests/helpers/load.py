"""A closed-loop load for tests: ``concurrency`` clients, each sending its next request when the
last is answered, for ``seconds``. The benchmarks have their own, with far more to report."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import numpy as np


@dataclass
class Point:
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def images_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("nan")


async def closed_loop(
    url: str,
    png: bytes,
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> Point:
    """POST ``png`` to ``url``/predict; connection errors count as statuses by their type."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.perf_counter()
    point = Point(seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while (sent := time.perf_counter()) < started + seconds:
                form = aiohttp.FormData()
                form.add_field("files", png, filename="a.png", content_type="image/png")
                try:
                    async with session.post(
                        f"{url}/predict", data=form, headers=headers
                    ) as response:
                        await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    point.statuses[type(exc).__name__] += 1
                    continue
                point.statuses[str(response.status)] += 1
                if response.status == 200:
                    point.latencies_ms.append(1000 * (time.perf_counter() - sent))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    point.seconds = time.perf_counter() - started
    return point
