"""A request's own deadline: a client may ask for less time than ``request_timeout_ms`` (REST's
``timeout_ms`` query parameter or ``X-Request-Timeout-Ms`` header, the protocol's ``timeout``
parameter, gRPC's deadline), and work that can no longer be answered in time is dropped before
it is decoded or computed, and answered 504 (docs/api.md).

The transport sets it where the request comes in; the door (app.batching.admission), the
pipeline and the batcher's queue read it.
"""

from __future__ import annotations

import asyncio
import math
from contextvars import ContextVar

from app.errors import InvalidParameter

# Loop time by which the client wants its answer; None: the server's request_timeout_ms alone.
deadline: ContextVar[float | None] = ContextVar("resnet_serve_deadline", default=None)
HEADER = b"x-request-timeout-ms"


def parse_timeout_ms(text: str, where: str) -> float:
    """A client's timeout in ms: a positive, finite number; InvalidParameter (422) otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameter(f"{where}={text[:32]!r} is not a positive number of milliseconds")
    return value


def set_timeout(milliseconds: float | None) -> None:
    """The current request's deadline: ``milliseconds`` from now, or none (None)."""
    if milliseconds is not None:
        deadline.set(asyncio.get_running_loop().time() + milliseconds / 1000)


def remaining_s() -> float | None:
    """Seconds left before the request's own deadline; None where it has none."""
    until = deadline.get()
    return None if until is None else until - asyncio.get_running_loop().time()
