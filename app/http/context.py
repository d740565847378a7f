"""Per-request context, outermost: request id, metrics, access log, and the last-resort 500."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.access import SCOPE_KEY, Access, Matched, RouteTable
from app.http.handlers import error_response
from app.process.logs import request_id
from app.process.metrics import Metrics

log = logging.getLogger("app.access")

# Echo a caller's id only if it is short and harmless in logs and headers.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Unique per process and cheap: uuid4 (a getrandom call each) showed up in overload profiles.
_ID_PREFIX = os.urandom(6).hex() + "-"
_ID_COUNTER = itertools.count(1)
# Refusals under overload (503) or from a key guesser (401) come by the thousand per second: one
# line per second, per status, stands for them.
REFUSAL_LOG_INTERVAL_S = 1.0
SAMPLED_STATUSES = (401, 503)


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


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: RouteTable) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self._refusals = {status: _Sampler(REFUSAL_LOG_INTERVAL_S) for status in SAMPLED_STATUSES}
        # Labelled children by (endpoint, status), bounded like the labels: a lookup in
        # prometheus_client takes a lock and builds a tuple on every request.
        self._series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        matched = scope[SCOPE_KEY] = self.routes.match(scope)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
        token = request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self._guarded(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, matched, status, time.perf_counter() - started)
            request_id.reset(token)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            # Logged with its traceback here; the client only learns that it was our fault.
            log.exception("unhandled error")
            if not started:
                response = error_response(
                    500, "internal_error", "internal server error", path=scope["path"]
                )
                await response(scope, receive, send)

    def _record(self, scope: Scope, matched: Matched, status: int, seconds: float) -> None:
        key = (matched.label, status)
        counter, histogram = self._series.get(key) or self._add_series(*key)
        counter.inc()
        histogram.observe(seconds)
        extra = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        if status in self._refusals:
            held_back = self._refusals[status].take(time.monotonic())
            if held_back is None:
                return
            extra["similar_not_logged"] = held_back
        level = logging.DEBUG if matched.access is Access.PROBE else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "request", extra=extra)

    def _add_series(self, endpoint: str, status: int) -> tuple[Counter, Histogram]:
        series = (
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)),
            self.metrics.request_seconds.labels(endpoint=endpoint),
        )
        self._series[(endpoint, status)] = series
        return series
