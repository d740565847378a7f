"""The front door, pure ASGI and before any routing: what a request may cost before it is served.

- Inference requests (routes declared ``Access.INFERENCE``: app.http.routing) are admitted here
  (app.batching.admission), before their body is read and before FastAPI's routing and dependency
  stack: waiting and refusing must cost far less than serving.
- Bodies stream in under three bounds: ``max_request_bytes`` per request, ``max_buffered_bytes``
  across all requests, and ``upload_timeout_ms`` for the whole upload (408, connection closed).
- A client gone mid-upload is a 499, never a 500.
"""

from __future__ import annotations

import asyncio

from opentelemetry.trace import SpanContext
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batching.admission import Admission, BufferAccount
from app.errors import ClientClosedRequest, UploadTimeout
from app.http.handlers import error_response
from app.http.routing import SCOPE_KEY, Access, Matched
from app.telemetry.tracing import NO_TRACING, Tracing, current, now_ns
from core.errors import PayloadTooLarge, ServiceError

CLOSE = {"Connection": "close"}
# Where handlers find the request's admission (app.http.deps.TicketDep).
TICKET_KEY = "admission_ticket"


class Intake:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int, upload_timeout_ms: float) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.upload_timeout_s = upload_timeout_ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            too_large = PayloadTooLarge(self._too_large(f"Content-Length {int(declared)}"))
            await _refuse(too_large, scope, receive, send)
            return
        admission: Admission | None = getattr(scope["app"].state, "admission", None)
        tracing: Tracing = getattr(scope["app"].state, "tracing", NO_TRACING)
        traced = current() if tracing.on else None
        upload = _Upload(tracing, traced)
        matched: Matched = scope[SCOPE_KEY]
        if admission is None or matched.access is not Access.INFERENCE or not matched.exact:
            await self.app(scope, self._limited(receive, None, upload), send)
            return
        try:
            with tracing.timed("admission"):
                ticket = await admission.enter()
        except ServiceError as refused:
            await _refuse(refused, scope, receive, send)
            return
        scope.setdefault("state", {})[TICKET_KEY] = ticket
        try:
            with admission.buffering() as account:
                await self.app(scope, self._limited(receive, account, upload), send)
        finally:
            ticket.release()

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

    def __init__(self, tracing: Tracing, parent: SpanContext | None) -> None:
        self.tracing = tracing
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
