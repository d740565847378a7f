"""Per-request context: request id, the request byte limit, metrics, access log, last-resort 500.

Pure ASGI rather than BaseHTTPMiddleware: the body limit has to wrap ``receive`` so it is
enforced while the upload streams in, before anything is buffered.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge
from app.handlers import error_response
from app.logs import request_id
from app.metrics import Metrics

log = logging.getLogger("app.access")

# Echo a caller's id only if it is short and harmless in logs and headers.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_request_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
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
            await self._guarded(scope, receive, send_with_id, headers)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]
    ) -> None:
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            error = PayloadTooLarge(self._too_large(f"Content-Length {int(declared)}"))
            response = error_response(error.status_code, error.code, error.message)
            await response(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._limited(receive), tracking_send)
        except Exception:
            # Logged with its traceback here; the client only learns that it was our fault.
            log.exception("unhandled error")
            if not started:
                response = error_response(500, "internal_error", "internal server error")
                await response(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise PayloadTooLarge(self._too_large(f"body of at least {received} bytes"))
            return message

        return receive_counted

    def _too_large(self, what: str) -> str:
        return f"request {what} is over max_request_bytes={self.max_request_bytes}"

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.metrics.request_seconds.labels(endpoint=endpoint).observe(seconds)
        log.info(
            "request",
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
            },
        )
