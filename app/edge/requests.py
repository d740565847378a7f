"""A call as every transport sees it: who it is for (``Caller``), its request id, its line in the
access log and its metrics (``RequestLog``), and the work it started, cancelled when its client
goes away (``unless_disconnected``).

A caller is an API key (its ``name=`` in the key file says which class it is counted under in
the metrics, its ``weight=`` how many turns it gets to another's one, its ``priority=`` whether
it goes before or after the others, its ``rate=`` and ``burst=`` how many requests it may send),
or, when keys are off, a client address, counted as "anonymous": addresses are the world's to
invent, so they never become metric labels, and key names are the operator's, as many as the
key file has lines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

from app.errors import ClientClosedRequest
from app.telemetry.metrics import Metrics

log = logging.getLogger("app.access")

T = TypeVar("T")
# Echo a caller's id only if it is short and harmless in logs and headers.
SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Refusals under overload (503), from a key guesser (401) or over a key's rate (429) come by the
# thousand per second: one line per second, per status, stands for them.
REFUSAL_LOG_INTERVAL_S = 1.0
SAMPLED_STATUSES = (401, 429, 503)
# The model version that answered an inference request, on its response: the access log and the
# request's span read it there, whichever transport and whichever version (a rollout's) answered.
MODEL_VERSION_HEADER = "x-model-version"


class Priority(IntEnum):
    """A caller's class in every queue: a higher class's work goes first (lower value first)."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


@dataclass(frozen=True)
class Rate:
    """A key's rate limit: ``per_second`` requests on average, ``burst`` of them at once."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class Caller:
    identity: str  # who shares: the key's digest or the client's address (never a label)
    label: str  # the class it is counted under in metrics: a key's name, "unnamed", "anonymous"
    weight: int = 1
    priority: Priority = Priority.NORMAL
    rate: Rate | None = None  # app.edge.limits; None: unlimited


ANONYMOUS = Caller("anonymous", "anonymous")
# Set per request where its key is checked; read by every queue it waits in.
caller: ContextVar[Caller] = ContextVar("resnet_serve_caller", default=ANONYMOUS)


def by_address(host: str | None) -> Caller:
    """The caller when keys are off: the client's address (behind a proxy, the one uvicorn reads
    from ``X-Forwarded-For`` when the proxy's address is in ``FORWARDED_ALLOW_IPS``)."""
    return Caller(f"address:{host}", ANONYMOUS.label) if host else ANONYMOUS


class RequestIds:
    """A call's request id: the caller's own ``x-request-id`` when it is safe to echo, else a new
    one, unique per process and cheap (uuid4, a getrandom call each, showed up in overload
    profiles)."""

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix + os.urandom(6).hex() + "-"
        self._counter = itertools.count(1)

    def __call__(self, given: str) -> str:
        return given if SAFE_ID.fullmatch(given) else f"{self._prefix}{next(self._counter):x}"


async def unless_disconnected(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]], work: Awaitable[T]
) -> T:
    """Await ``work`` in this task, cancelling it (and its queued images) if the client goes away:
    ``receive`` is the ASGI channel of the call, which yields only a disconnect once its body has
    been read (call it only then).

    One watcher task per request, which cancels this one: a second task for the work and
    ``asyncio.wait`` over both cost measurable event-loop time on every request.
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()
        raise ClientClosedRequest(
            "the client closed the connection before the answer was ready"
        ) from None
    finally:
        watcher.cancel()


class _Sampler:
    """Lets one event through per interval and counts the ones it held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0
        self.held_back = 0

    def take(self, now: float) -> int | None:
        """None to stay silent; else how many events were held back since the last one."""
        if now < self.next_at:
            self.held_back += 1
            return None
        held_back, self.held_back = self.held_back, 0
        self.next_at = now + self.interval_s
        return held_back


class RequestLog:
    """Counts, times and logs every answered request, HTTP's and gRPC's alike: a metric and an
    access log line each, refusals (401, 503) sampled to a line a second per status."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._refusals = {status: _Sampler(REFUSAL_LOG_INTERVAL_S) for status in SAMPLED_STATUSES}
        # Labelled children by (endpoint, status), bounded like the labels: a lookup in
        # prometheus_client takes a lock and builds a tuple on every request.
        self._series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._callers: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def record(
        self,
        endpoint: str,
        method: str,
        path: str,
        status: int,
        seconds: float,
        traced: str | None,
        probe: bool = False,
        caller: Caller | None = None,
        model_version: str | None = None,
    ) -> None:
        """``endpoint``: the metric label (a route template); ``probe``: logged at debug;
        ``caller``: an inference request's, counted by its class too; ``model_version``: the
        version that answered it."""
        metrics = self.metrics
        counter, histogram = self._children(
            self._series, (metrics.requests, metrics.request_seconds), "endpoint", endpoint, status
        )
        counter.inc()
        # A sampled request's trace id on its latency bucket: from a slow bucket to its trace.
        histogram.observe(seconds, {"trace_id": traced} if traced else None)
        if caller is not None:
            families = (metrics.caller_requests, metrics.caller_request_seconds)
            counter, histogram = self._children(
                self._callers, families, "caller", caller.label, status
            )
            counter.inc()
            histogram.observe(seconds)
        extra: dict[str, object] = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        if traced:
            extra["trace_id"] = traced
        if model_version is not None:
            extra["model_version"] = model_version
        if status in self._refusals:
            held_back = self._refusals[status].take(time.monotonic())
            if held_back is None:
                return
            extra["similar_not_logged"] = held_back
        level = logging.DEBUG if probe else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "request", extra=extra)

    @staticmethod
    def _children(
        cache: dict[tuple[str, int], tuple[Counter, Histogram]],
        families: tuple[Counter, Histogram],
        label: str,
        value: str,
        status: int,
    ) -> tuple[Counter, Histogram]:
        found = cache.get((value, status))
        if found is None:
            counter, histogram = families
            found = cache[(value, status)] = (
                counter.labels(**{label: value, "status": str(status)}),
                histogram.labels(**{label: value}),
            )
        return found
