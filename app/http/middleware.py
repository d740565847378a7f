"""Every HTTP request's way in, pure ASGI and before any routing (``Door``): its context, its key,
its admission and the bounds on its body. Waiting and refusing must cost far less than serving.

- Context, outermost: the route it matches (its declared access: app.http.routing), its request
  id, its trace span, the in-flight gauge, its line in the access log and its metrics
  (app.edge.requests), and the last-resort 500.
- Its key, by the access the route declares (app.edge.access): a refused request never reaches
  admission, routing or its body.
- Inference requests (``Access.INFERENCE``) are admitted at the door (app.batching.admission),
  before their body is read and before FastAPI's routing and dependency stack.
- Bodies stream in under three bounds: ``max_request_bytes`` per request, ``max_buffered_bytes``
  across all requests, and ``upload_timeout_ms`` for the whole upload (408, connection closed).
  A client gone mid-upload is a 499, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl

import orjson
from opentelemetry.trace import SpanContext
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batching.admission import BufferAccount
from app.batching.deadline import HEADER as DEADLINE_HEADER
from app.batching.deadline import parse_timeout_ms, set_timeout
from app.edge.access import Access, KeyRefused, check_key
from app.edge.requests import MODEL_VERSION_HEADER, Caller, RequestIds, by_address, caller
from app.errors import ClientClosedRequest, UploadTimeout
from app.http.handlers import error_response
from app.http.routing import Matched, RouteTable
from app.pipeline.cache import Seen, seen
from app.service import Service
from app.telemetry.logs import request_id
from app.telemetry.tracing import current, end_status, now_ns, trace_id, trace_response
from core.errors import PayloadTooLarge, ServiceError

log = logging.getLogger("app.access")

CLOSE = {"Connection": "close"}
Direct = Callable[[Service, Scope, Receive, Send], Awaitable[bool]]
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


class Door:
    def __init__(
        self,
        app: ASGIApp,
        *,
        service: Service,
        routes: RouteTable,
        max_request_bytes: int,
        upload_timeout_ms: float,
        direct: Mapping[tuple[str, str], Direct] | None = None,
    ) -> None:
        """``direct``: handlers, by method and route, that answer admitted requests themselves
        (True) or leave them to the app (False, nothing sent)."""
        self.app = app
        self.direct = dict(direct or {})
        self.service = service
        self.routes = routes
        self.max_request_bytes = max_request_bytes
        self.upload_timeout_s = upload_timeout_ms / 1000
        self.ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        matched = self.routes.match(scope)
        headers = dict(scope["headers"])
        rid = self.ids(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = request_id.set(rid)
        method, path = scope["method"], scope["path"]

        def describe() -> tuple[str, dict[str, str]]:
            route = matched.label if matched.exact else ""
            attributes = {"http.request.method": method, "http.route": route, "url.path": path}
            return (f"{method} {route}" if route else method), attributes

        tracing = self.service.tracing
        # Off, tracing costs nothing per request: no span, no call into it.
        with tracing.request(headers, describe) if tracing.on else _NO_SPAN as span:
            status, refusal = 500, _Refusal()
            started = time.perf_counter()
            extra = [(b"x-request-id", rid.encode())]
            if span is not None and (traced := trace_response(span)) is not None:
                extra.append((b"traceresponse", traced))

            answered_by: str | None = None
            cached = Seen()
            if self.service.settings.cache_bytes:
                seen.set(cached)  # what the cache answered (app.pipeline.cache)

            async def send_with_id(message: Message) -> None:
                nonlocal status, answered_by
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = message.get("headers", [])
                    answered_by = _answered_by(headers)
                    message["headers"] = [*headers, *extra]
                    if status == 200 and (hit := cached.header) is not None:
                        message["headers"].append((b"x-cache", hit.encode()))
                elif status >= 400 and span is not None and span.is_recording():
                    refusal.read(message)
                await send(message)

            metrics = self.service.metrics
            metrics.in_flight.inc()
            who: Caller | None = None
            try:
                who = await self._guarded(scope, receive, send_with_id, matched, headers)
            finally:
                metrics.in_flight.dec()
                seconds = time.perf_counter() - started
                traced_id = None
                if span is not None:
                    end_status(span, status, refusal.code, refusal.message)
                    if answered_by is not None:
                        span.set_attribute("resnet_serve.model_version", answered_by)
                    traced_id = trace_id(span)
                counted = who if matched.access is Access.INFERENCE else None
                probe = matched.access is Access.PROBE
                self.service.request_log.record(
                    matched.label,
                    method,
                    path,
                    status,
                    seconds,
                    traced_id,
                    probe,
                    counted,
                    answered_by,
                )
                request_id.reset(token)

    async def _guarded(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        matched: Matched,
        headers: dict[bytes, bytes],
    ) -> Caller | None:
        """The request past its key check and its admission; the caller it is for."""
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        who: Caller | None = None
        try:
            who = self._caller(scope, matched, headers)
            caller_token = caller.set(who)  # the queues behind the door read it
            try:
                await self._admitted(scope, receive, tracking_send, matched, headers)
            finally:
                caller.reset(caller_token)
        except KeyRefused as refused:
            self.service.metrics.auth_refused.labels(reason=refused.reason).inc()
            await _refuse(refused, scope, receive, tracking_send)
        except Exception:
            # Logged with its traceback here; the client only learns that it was our fault.
            log.exception("unhandled error")
            if not started:
                response = error_response(
                    500, "internal_error", "internal server error", path=scope["path"]
                )
                await response(scope, receive, send)
        return who

    def _caller(self, scope: Scope, matched: Matched, headers: dict[bytes, bytes]) -> Caller:
        keys = self.service.key_files
        found = check_key(matched.access, headers, keys) if keys else None
        if found is not None:
            return found
        client = scope.get("client")
        return by_address(client[0] if client else None)

    async def _admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        matched: Matched,
        headers: dict[bytes, bytes],
    ) -> None:
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            too_large = PayloadTooLarge(self._too_large(f"Content-Length {int(declared)}"))
            await _refuse(too_large, scope, receive, send)
            return
        service = self.service
        upload = _Upload(service, current() if service.tracing.on else None)
        admission = getattr(service, "admission", None)
        if admission is None or matched.access is not Access.INFERENCE or not matched.exact:
            await self.app(scope, self._limited(receive, None, upload), send)
            return
        try:
            # Before the deadline and the door: a request over its key's rate waits nowhere.
            verdict = await service.rate_limits.check(caller.get())
            set_timeout(_asked_timeout_ms(scope["query_string"], headers))
            if service.tracing.on:
                with service.tracing.timed("admission"):
                    ticket = await admission.enter()
            else:
                ticket = await admission.enter()
        except ServiceError as refused:
            await _refuse(refused, scope, receive, send)
            return
        if verdict is not None:
            send = _with_headers(send, verdict.headers())
        with ticket, admission.buffering() as account:
            limited = self._limited(receive, account, upload)
            direct = self.direct.get((scope["method"], matched.label))
            if direct is None or not await direct(service, scope, limited, send):
                await self.app(scope, limited, send)

    def _limited(self, receive: Receive, account: BufferAccount | None, upload: _Upload) -> Receive:
        received = 0
        deadline = asyncio.get_running_loop().time() + self.upload_timeout_s
        complete = False

        async def receive_counted() -> Message:
            nonlocal received, complete
            if complete:  # from here on only a disconnect can come: no deadline
                return await receive()
            upload.begin()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
                if message["type"] == "http.request":
                    size = len(message.get("body", b""))
                    received += size
                    complete = not message.get("more_body", False)
                    if received > self.max_request_bytes:
                        raise PayloadTooLarge(self._too_large(f"body of at least {received} bytes"))
                    if account is not None:
                        account.add(size)
                elif message["type"] == "http.disconnect" and not complete:
                    raise ClientClosedRequest(
                        f"the client closed the connection mid-upload ({received} bytes received)"
                    )
            except TimeoutError:
                error = UploadTimeout(
                    f"the upload took longer than upload_timeout_ms="
                    f"{self.upload_timeout_s * 1000:g} ({received} bytes received)",
                    headers=CLOSE,
                )
                upload.end(received, error.message)
                raise error from None
            except ServiceError as exc:
                upload.end(received, exc.message)
                raise
            if complete:
                upload.end(received)
            return message

        return receive_counted

    def _too_large(self, what: str) -> str:
        return f"request {what} is over max_request_bytes={self.max_request_bytes}"


class _Upload:
    """The span of reading a request's body, from the first read to the last byte."""

    def __init__(self, service: Service, parent: SpanContext | None) -> None:
        self.tracing = service.tracing
        self.parent = parent
        self.started_ns = 0

    def begin(self) -> None:
        if self.parent is not None and not self.started_ns:
            self.started_ns = now_ns()

    def end(self, received: int, error: str | None = None) -> None:
        if self.parent is None or not self.started_ns:
            return
        body = {"http.request.body.size": received}
        self.tracing.stage(
            "read body", self.started_ns, now_ns(), body, parent=self.parent, error=error
        )
        self.parent = None  # once


async def _refuse(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    # The connection stays open: uvicorn discards the unread body in its C parser. Closing it
    # with body bytes unread makes the kernel reset it, and clients saw errors instead of 503s.
    response = error_response(
        error.status_code, error.code, error.message, error.headers, path=scope["path"]
    )
    await response(scope, receive, send)


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


def _with_headers(send: Send, extra: dict[str, str]) -> Send:
    """``send``, adding ``extra`` to the response's head."""
    encoded = [(name.lower().encode(), value.encode()) for name, value in extra.items()]

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *encoded]
        await send(message)

    return sending


def _answered_by(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The model version an inference response says answered it (app.edge.requests)."""
    wanted = MODEL_VERSION_HEADER.encode()
    for name, value in headers:
        if name == wanted:
            return value.decode("latin-1")
    return None


def _asked_timeout_ms(query: bytes, headers: dict[bytes, bytes]) -> float | None:
    """The client's own timeout: the ``timeout_ms`` query parameter, else the
    ``X-Request-Timeout-Ms`` header; None where it gives neither (app.batching.deadline)."""
    if b"timeout_ms" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if name == "timeout_ms":
                return parse_timeout_ms(value, "timeout_ms")
    header = headers.get(DEADLINE_HEADER)
    if header is not None:
        return parse_timeout_ms(header.decode("latin-1"), "X-Request-Timeout-Ms")
    return None
