"""API keys at the door, pure ASGI: a refused request never reaches admission, routing or its body.

Protected when a key set is configured, by the access each route declares (app.http.access):
``Access.INFERENCE`` and ``Access.API`` routes by the API keys, ``Access.METRICS`` by the metrics
keys. Health probes, the docs and the page are ``Access.OPEN``. A key comes as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.access import SCOPE_KEY, Access, Matched
from app.http.handlers import error_response
from app.process.keys import MAX_KEY_BYTES, KeyFile
from app.process.metrics import Metrics

_CHALLENGE = 'Bearer realm="resnet-serve"'
_MESSAGES = {
    "missing": "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>",
    "empty": "the API key is empty",
    "too_long": f"the API key is longer than {MAX_KEY_BYTES} bytes",
    "invalid": "the API key is not valid",
}


def presented_key(scope: Scope) -> bytes | None:
    """The key the request carries: a Bearer token, else X-API-Key; None when it has neither."""
    headers: dict[bytes, bytes] = dict(scope["headers"])
    scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return token.strip()
    return headers.get(b"x-api-key")


def refusal(key: bytes | None, keys: KeyFile) -> str | None:
    """Why ``key`` is refused (a metrics label), or None when it is one of ``keys``."""
    if key is None:
        return "missing"
    if not key:
        return "empty"
    if len(key) > MAX_KEY_BYTES:
        return "too_long"
    return None if keys.matches(key) else "invalid"


class RequireKey:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: KeyFile | None,
        metrics_keys: KeyFile | None,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.metrics_keys = metrics_keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self._keys(scope[SCOPE_KEY]) if scope["type"] == "http" else None
        reason = None if keys is None else refusal(presented_key(scope), keys)
        if reason is None:
            await self.app(scope, receive, send)
            return
        self.metrics.auth_refused.labels(reason=reason).inc()
        challenge = _CHALLENGE if reason == "missing" else f'{_CHALLENGE}, error="invalid_token"'
        response = error_response(
            401,
            "unauthorized",
            _MESSAGES[reason],
            {"WWW-Authenticate": challenge},
            path=scope["path"],  # the Open Inference Protocol's own error shape under /v2
        )
        await response(scope, receive, send)

    def _keys(self, matched: Matched) -> KeyFile | None:
        """The key set that guards the matched route; None if it is open."""
        if matched.access is Access.METRICS:
            return self.metrics_keys
        if matched.access in (Access.API, Access.INFERENCE):
            return self.api_keys
        return None
