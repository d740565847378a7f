"""API keys at the door, pure ASGI: a refused request never reaches admission, routing or its body.

Protected when a key set is configured: inference (``/predict``, ``/v2/models/...``) and the
model's description (``/v1/model``) by the API keys; ``/metrics`` by the metrics keys. Health
probes, the docs and everything else stay open. A key comes as ``Authorization: Bearer <key>``
or ``X-API-Key: <key>``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.handlers import error_response
from app.intake import ENDPOINT_KEY, inference_endpoint
from app.keys import MAX_KEY_BYTES, KeyFile
from app.metrics import Metrics

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
        protected = self._protected(scope) if scope["type"] == "http" else None
        reason = None if protected is None else refusal(presented_key(scope), protected[1])
        if protected is None or reason is None:
            await self.app(scope, receive, send)
            return
        self.metrics.auth_refused.labels(reason=reason).inc()
        scope[ENDPOINT_KEY] = protected[0]
        challenge = _CHALLENGE if reason == "missing" else f'{_CHALLENGE}, error="invalid_token"'
        response = error_response(
            401,
            "unauthorized",
            _MESSAGES[reason],
            {"WWW-Authenticate": challenge},
            path=scope["path"],  # the Open Inference Protocol's own error shape under /v2
        )
        await response(scope, receive, send)

    def _protected(self, scope: Scope) -> tuple[str, KeyFile] | None:
        """The endpoint's metrics label (routing has not run) and its keys; None if open."""
        path: str = scope["path"]
        if path == "/metrics" and self.metrics_keys is not None:
            return path, self.metrics_keys
        if self.api_keys is None:
            return None
        if path in ("/predict", "/v1/model"):
            return path, self.api_keys
        if path.startswith("/v2/models/"):
            # A template, so that made-up model names cannot grow the label set.
            return inference_endpoint(scope) or "/v2/models/{model_name}", self.api_keys
        return None
