"""API keys at the door, pure ASGI: a refused request never reaches admission, routing or its body.

Protected when a key set is configured, by the access each route declares (app.http.routing):
``Access.INFERENCE`` and ``Access.API`` routes by the API keys, ``Access.METRICS`` by the metrics
keys, ``Access.REPOSITORY`` by the repository keys (and refused while other keys are in use but
no repository keys are). Health probes, the docs and the page are ``Access.OPEN``. A key comes as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from app.edge.callers import Caller, by_address, caller
from app.edge.keys import MAX_KEY_BYTES, KeyFile
from app.http.handlers import error_response
from app.http.routing import CALLER_KEY, SCOPE_KEY, Access, Matched
from app.telemetry.metrics import Metrics

_CHALLENGE = 'Bearer realm="resnet-serve"'
_MESSAGES = {
    "missing": "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>",
    "empty": "the API key is empty",
    "too_long": f"the API key is longer than {MAX_KEY_BYTES} bytes",
    "invalid": "the API key is not valid",
}


def presented_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    """The key the request carries: a Bearer token, else X-API-Key; None when it has neither."""
    scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return token.strip()
    return headers.get(b"x-api-key")


def identify(key: bytes | None, keys: KeyFile) -> Caller | str:
    """The caller ``key`` stands for, or why it is refused (a metrics label)."""
    if key is None:
        return "missing"
    if not key:
        return "empty"
    if len(key) > MAX_KEY_BYTES:
        return "too_long"
    return keys.match(key) or "invalid"


# Which key set guards each kind of route (app.http.routing); the rest are open.
KEY_SETS = {
    Access.API: "api",
    Access.INFERENCE: "api",
    Access.METRICS: "metrics",
    Access.REPOSITORY: "repository",
}


@dataclass(frozen=True)
class Refused:
    status: int
    code: str
    message: str
    reason: str  # the metrics label


def check_key(
    access: Access, headers: Mapping[bytes, bytes], keys: Mapping[str, KeyFile]
) -> Refused | Caller | None:
    """Why a call of ``access`` with these headers (or gRPC metadata) is refused; else the
    caller its key stands for, or None where no key guards it."""
    name = KEY_SETS.get(access)
    key_set = keys.get(name) if name is not None else None
    if name == "repository" and key_set is None and keys:
        # Keys are in use, but none may change models: an inference key must not unload.
        message = (
            "the repository API needs a repository key, and none is configured "
            "(RESNET_SERVE_REPOSITORY_API_KEYS_FILE)"
        )
        return Refused(403, "forbidden", message, "no_key_set")
    if key_set is None:
        return None
    found = identify(presented_key(headers), key_set)
    if isinstance(found, Caller):
        return found
    return Refused(401, "unauthorized", _MESSAGES[found], found)


class RequireKey:
    def __init__(self, app: ASGIApp, *, keys: dict[str, KeyFile], metrics: Metrics) -> None:
        """``keys``: the configured key sets by name (app.main.key_files)."""
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        matched: Matched = scope[SCOPE_KEY]
        refused = check_key(matched.access, dict(scope["headers"]), self.keys)
        if not isinstance(refused, Refused):
            client = scope.get("client")
            scope[CALLER_KEY] = who = refused or by_address(client[0] if client else None)
            caller.set(who)  # the queues behind the door read it (app.batching.fair)
            await self.app(scope, receive, send)
            return
        self.metrics.auth_refused.labels(reason=refused.reason).inc()
        headers = {}
        if refused.status == 401:
            invalid = refused.reason != "missing"
            headers["WWW-Authenticate"] = _CHALLENGE + (
                ', error="invalid_token"' if invalid else ""
            )
        response = error_response(
            refused.status,
            refused.code,
            refused.message,
            headers,
            path=scope["path"],  # the Open Inference Protocol's own error shape under /v2
        )
        await response(scope, receive, send)
