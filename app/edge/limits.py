"""Per-key rate limits (a key's ``rate=`` and ``burst=``: app.edge.access): beyond them a request
is refused 429 ``rate_limited`` at the door, before its body is read or it waits anywhere.

A limit counts requests, not images: it is checked before the body is read (the cheapest
refusal there is), it is what the IETF ``RateLimit`` headers count, and the images of one
request are bounded by ``max_images_per_request``; the share of the model each key gets under
contention is the fair shares' work (app.batching.fair), which count images. Refused requests
cost nothing: they are not counted against the limit.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one number per
key: the time at which its bucket would be full again), so one limit is one float wherever it
is kept:

- one process: a dict;
- several workers (``RESNET_SERVE_WORKERS``): a table in shared memory that the supervisor makes
  and every worker updates under one lock (``SharedTable``), so the limit holds for the whole
  server whichever worker a connection lands on;
- several servers: Redis (``RESNET_SERVE_REDIS_URL``), one script call per request, on Redis's
  clock; if Redis fails, each server goes on with its own table until Redis answers again.

Every answer to a limited key carries ``RateLimit-Policy`` and ``RateLimit`` (the IETF draft
draft-ietf-httpapi-ratelimit-headers-12), and a refusal ``Retry-After``; gRPC gets the same as
metadata and RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``.

A refusal is answered when its caller's next request would be let through (behind the key's
other refusals waiting, one interval each), at most ``rate_limit_delay_ms`` (1 s) later, its
Retry-After shortened by as much: refusing at once cost the other keys about 40% of a core
against 32 clients that resend at once (2,300 refusals a second, each ~0.2 ms of the event
loop), where waiting costs nothing but a sleeping task. A client that resends at once then comes
back just as there is room for it: it gets its rate, and about one refusal per request let
through.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import math
import time
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnContext
from typing import Protocol

from redis.asyncio import Redis

from app.edge.requests import Caller, Rate
from app.store.redis import PREFIX, SharedRedis
from app.telemetry.metrics import Metrics
from core.errors import ServiceError

# Shared memory: slots for this many limited keys, each found within PROBES of its hash.
SLOTS = 4096
PROBES = 16
# Held for microseconds by a healthy worker.
LOCK_TIMEOUT_S = 0.05
# Float error on the boundary must never refuse the request that exactly fits.
EPSILON_S = 1e-9


@dataclass(frozen=True)
class Verdict:
    """A request's fate under its key's limit: let through or not, the requests that could
    still go at once (``remaining``), the seconds until the bucket is full (``reset_s``) and, if
    refused, until one more would be let through (``retry_s``)."""

    rate: Rate
    allowed: bool
    remaining: int
    reset_s: float
    retry_s: float = 0.0

    def later(self, seconds: float) -> Verdict:
        """The same verdict told ``seconds`` later."""
        return replace(
            self,
            reset_s=max(0.0, self.reset_s - seconds),
            retry_s=max(0.0, self.retry_s - seconds),
        )

    def headers(self) -> dict[str, str]:
        """The IETF draft's fields: the policy (its quota ``q`` per window ``w`` seconds, the
        burst refilled at the rate) and what is left of it."""
        rate = self.rate
        window = max(1, math.ceil(rate.burst / rate.per_second - EPSILON_S))
        quota = max(rate.burst, round(rate.per_second * window))
        found = {
            "RateLimit-Policy": f'"key";q={quota};w={window}',
            "RateLimit": f'"key";r={self.remaining};t={math.ceil(self.reset_s - EPSILON_S)}',
        }
        if not self.allowed:
            found["Retry-After"] = str(max(0, math.ceil(self.retry_s - EPSILON_S)))
        return found


def gcra(full_at: float, now: float, rate: Rate) -> tuple[float, Verdict]:
    """One request at ``now`` against a bucket full at ``full_at``: the new ``full_at`` and the
    verdict. A refusal leaves the bucket as it was."""
    interval = 1.0 / rate.per_second
    tolerance = rate.burst * interval
    start = max(full_at, now)
    after = start + interval
    if after - now > tolerance + EPSILON_S:
        return full_at, Verdict(rate, False, 0, start - now, after - tolerance - now)
    remaining = int((tolerance - (after - now)) / interval + EPSILON_S)
    return after, Verdict(rate, True, remaining, after - now)


class Table(Protocol):
    def take(self, identity: str, rate: Rate, now: float) -> Verdict:
        """One request of ``identity``'s, at ``now`` (time.monotonic())."""


class LocalTable:
    """One process's buckets."""

    def __init__(self) -> None:
        self._full_at: dict[str, float] = {}

    def take(self, identity: str, rate: Rate, now: float) -> Verdict:
        full_at, verdict = gcra(self._full_at.get(identity, now), now, rate)
        self._full_at[identity] = full_at
        return verdict


class SharedTable:
    """The buckets of every worker of one server, in shared memory made by the supervisor
    (before the workers are spawned: they get it as an argument). time.monotonic() is the
    machine's clock, the same in every process.

    An open-addressed table of (64-bit hash of the identity, full-at time); a slot whose bucket
    is already full again holds nothing worth keeping, so it is free for another key. A key that
    finds no slot (over SLOTS keys busy at once), or a lock held past LOCK_TIMEOUT_S (its holder
    was killed inside it), is limited by its worker alone.
    """

    def __init__(self, context: SpawnContext) -> None:
        self._owners = context.RawArray(ctypes.c_uint64, SLOTS)
        self._full_at = context.RawArray(ctypes.c_double, SLOTS)
        self._lock = context.Lock()
        self._overflow = LocalTable()

    def take(self, identity: str, rate: Rate, now: float) -> Verdict:
        digest = hashlib.blake2b(identity.encode(), digest_size=8).digest()
        owner = int.from_bytes(digest, "little") or 1  # 0 marks a slot never used
        owners, full_at = self._owners, self._full_at
        # A worker SIGKILLed inside the lock would hold it for good: past a wait no healthy
        # holder ever needs, this worker limits on its own instead of stopping.
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            return self._overflow.take(identity, rate, now)
        try:
            free = None
            for probe in range(PROBES):
                slot = (owner + probe) % SLOTS
                if owners[slot] == owner:
                    full_at[slot], verdict = gcra(full_at[slot], now, rate)
                    return verdict
                if free is None and (owners[slot] == 0 or full_at[slot] <= now):
                    free = slot
            if free is not None:
                owners[free] = owner
                full_at[free], verdict = gcra(now, now, rate)
                return verdict
        finally:
            self._lock.release()
        return self._overflow.take(identity, rate, now)


# On Redis's own clock (TIME), so that servers whose clocks differ agree; milliseconds, as
# strings both ways (Lua numbers come back as integers). A refusal writes nothing.
_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local start = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local after = start + interval
if after - now > tolerance + 0.000001 then
  return {0, tostring(start - now), tostring(after - tolerance - now)}
end
redis.call('SET', KEYS[1], tostring(after), 'PX', math.ceil(after - now) + 1000)
return {1, tostring(after - now), '0'}
"""


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, verdict: Verdict) -> None:
        rate = verdict.rate
        super().__init__(
            f"this key may send {rate.per_second:g} requests per second (a burst of "
            f"{rate.burst}); retry in {verdict.retry_s:.3g} s",
            headers=verdict.headers(),
        )
        self.retry_ms = math.ceil(verdict.retry_s * 1000)


class Limiter:
    """The rate limits of one worker: in its own table, the server's (``share``) or Redis."""

    def __init__(
        self, metrics: Metrics, redis: SharedRedis | None = None, delay_ms: float = 0.0
    ) -> None:
        """``delay_ms``: how long a refusal waits to be answered (``rate_limit_delay_ms``)."""
        self.table: Table = LocalTable()
        self.delay_s = delay_ms / 1000
        self._holding: dict[str, int] = {}  # refusals waiting to be answered, by key
        self._redis = redis
        self._script = redis.client.register_script(_SCRIPT) if redis is not None else None
        self._metrics = metrics

    def share(self, table: SharedTable) -> None:
        """Keep the limits in the server's shared table (a worker's, from its supervisor)."""
        self.table = table

    async def check(self, who: Caller) -> Verdict | None:
        """Counts one request of ``who`` against its limit; raises RateLimited beyond it. None
        for a caller without a limit."""
        rate = who.rate
        if rate is None:
            return None
        verdict = None
        if self._redis is not None:
            verdict = await self._redis.call("limits", lambda client: self._shared(who, client))
        if verdict is None:
            verdict = self.table.take(who.identity, rate, time.monotonic())
        if not verdict.allowed:
            self._metrics.rate_limited.labels(caller=who.label).inc()
            if self.delay_s:
                verdict = await self._paced(who.identity, verdict)
            raise RateLimited(verdict)
        return verdict

    async def _paced(self, identity: str, verdict: Verdict) -> Verdict:
        """The refusal told when its caller's next request would be let through, behind the
        refusals of the same key already waiting (one interval each), at most ``delay_s``
        later: a client that resends at once then comes back when there is room for it."""
        waiting = self._holding.get(identity, 0)
        hold_s = min(self.delay_s, verdict.retry_s + waiting / verdict.rate.per_second)
        self._holding[identity] = waiting + 1
        try:
            await asyncio.sleep(hold_s)
        finally:
            left = self._holding[identity] - 1
            if left:
                self._holding[identity] = left
            else:
                del self._holding[identity]
        return verdict.later(hold_s)

    async def _shared(self, who: Caller, client: Redis) -> Verdict:
        rate = who.rate
        assert self._script is not None
        assert rate is not None
        interval_ms = 1000 / rate.per_second
        keys = [f"{PREFIX}rate:{who.identity}"]
        args = [repr(interval_ms), repr(rate.burst * interval_ms)]
        allowed, reset_ms, retry_ms = await self._script(keys=keys, args=args, client=client)
        reset_s, retry_s = float(reset_ms) / 1000, float(retry_ms) / 1000
        if not int(allowed):
            return Verdict(rate, False, 0, reset_s, retry_s)
        tolerance_s = rate.burst / rate.per_second
        remaining = int((tolerance_s - reset_s) * rate.per_second + EPSILON_S)
        return Verdict(rate, True, max(0, remaining), reset_s)
