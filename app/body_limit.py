"""The request byte limit, enforced while the body streams in, before anything is buffered.

Pure ASGI rather than BaseHTTPMiddleware: the limit has to wrap ``receive``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.handlers import error_response
from core.errors import PayloadTooLarge


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            error = PayloadTooLarge(self._too_large(f"Content-Length {int(declared)}"))
            response = error_response(error.status_code, error.code, error.message)
            await response(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

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
