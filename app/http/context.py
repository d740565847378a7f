"""Per-request context, outermost: request id, trace span, metrics, access log, and the
last-resort 500."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

import orjson
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.edge.callers import Caller
from app.http.handlers import error_response
from app.http.routing import CALLER_KEY, SCOPE_KEY, Access, RouteTable
from app.telemetry.logs import request_id
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing, end_status, trace_id, trace_response

log = logging.getLogger("app.access")

# Echo a caller's id only if it is short and harmless in logs and headers.
SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
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
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        routes: RouteTable,
        tracing: Tracing,
        requests: RequestLog,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.tracing = tracing
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        matched = scope[SCOPE_KEY] = self.routes.match(scope)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if SAFE_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
        token = request_id.set(rid)
        method = scope["method"]

        def describe() -> tuple[str, dict[str, str]]:
            route = matched.label if matched.exact else ""
            attributes = {"http.request.method": method, "http.route": route, "url.path": path}
            return (f"{method} {route}" if route else method), attributes

        path = scope["path"]
        with self.tracing.request(headers, describe) as span:
            status, refusal = 500, _Refusal()
            started = time.perf_counter()
            extra = [(b"x-request-id", rid.encode())]
            if (traced := trace_response(span)) is not None:
                extra.append((b"traceresponse", traced))

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), *extra]
                elif status >= 400 and span is not None and span.is_recording():
                    refusal.read(message)
                await send(message)

            self.metrics.in_flight.inc()
            try:
                await self._guarded(scope, receive, send_with_id)
            finally:
                self.metrics.in_flight.dec()
                end_status(span, status, refusal.code, refusal.message)
                seconds = time.perf_counter() - started
                probe = matched.access is Access.PROBE
                who = scope.get(CALLER_KEY) if matched.access is Access.INFERENCE else None
                self.requests.record(
                    matched.label, method, path, status, seconds, trace_id(span), probe, who
                )
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
    ) -> None:
        """``endpoint``: the metric label (a route template); ``probe``: logged at debug;
        ``caller``: an inference request's, counted by its class too."""
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


class _Refusal:
    """The code and message of an error answer (app.http.handlers' shapes), for its span."""

    code: str | None = None
    message: str | None = None

    def read(self, message: Message) -> None:
        if message["type"] != "http.response.body" or self.message is not None:
            return
        try:
            error = orjson.loads(message.get("body", b"")).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(error, dict):
            self.code, self.message = error.get("code"), error.get("message")
        elif isinstance(error, str):
            self.message = error
