"""Redis shared by the replicas of one service (``RESNET_SERVE_REDIS_URL``): the per-key rate
limits (app.edge.limits) and the answer cache (app.pipeline.cache) hold for the service, not
per server.

Redis is a help, never a dependency of a request: a call that fails, or takes longer than
``redis_timeout_ms``, is counted (``resnet_serve_redis_errors_total{use}``), its caller goes on
with its own local state, and for ``BACKOFF_S`` no call is tried at all, so a Redis that is down
costs each request nothing, not a timeout each. ``resnet_serve_redis_up`` says which it is, and
the change is logged once each way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from app.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
# After a failed call, how long the server goes on alone before asking Redis again.
BACKOFF_S = 1.0
# Every key this service writes starts with it: one Redis may serve other things too.
PREFIX = "resnet-serve:"


class SharedRedis:
    def __init__(self, url: str, timeout_ms: float, metrics: Metrics) -> None:
        """Connects lazily: a Redis that is down at start-up is a warning, not a failed start."""
        timeout_s = timeout_ms / 1000
        # One immediate retry, on a new connection: a pooled connection to a Redis that has
        # restarted fails once; more would spend the time the request is waiting.
        self.client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._down_until = 0.0
        self.up = True
        metrics.track(metrics.redis_up.labels("redis"), lambda: 1.0 if self.up else 0.0)

    async def call(self, use: str, work: Callable[[Redis], Awaitable[T]]) -> T | None:
        """``work``'s answer, or None where Redis failed (or is resting after a failure);
        ``use``: what it was for, the metric's label ("limits", "cache")."""
        if not self.up and time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await work(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(use, exc)
            return None
        if not self.up:
            self.up = True
            log.info("redis answers again; rate limits and the cache are shared again")
        return answer

    def _failed(self, use: str, exc: BaseException) -> None:
        self._metrics.redis_errors.labels(use=use).inc()
        self._down_until = time.monotonic() + BACKOFF_S
        if self.up:
            self.up = False
            log.warning(
                "redis does not answer; serving on this server's own rate limits and cache",
                extra={"use": use, "error": type(exc).__name__, "reason": str(exc)[:200]},
            )

    async def close(self) -> None:
        await self.client.aclose()
