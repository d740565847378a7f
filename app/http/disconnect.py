"""Stop work nobody will read: cancel a request's pipeline when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from app.errors import ClientClosedRequest

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` in this task, cancelling it (and its queued images) if the client goes away.

    Only call once the body has been read: from then on ``receive`` yields only disconnects.
    One watcher task per request, which cancels this one: a second task for the work and
    ``asyncio.wait`` over both cost measurable event-loop time on every request.
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()
        raise ClientClosedRequest(
            "the client closed the connection before the answer was ready"
        ) from None
    finally:
        watcher.cancel()
