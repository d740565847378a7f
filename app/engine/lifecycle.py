"""Readiness: whether the server takes inference work now.

Admission by load is app.engine.admission's."""

from __future__ import annotations

import asyncio

from app.errors import NotReady, ShuttingDown


class Lifecycle:
    """Readiness: warmed up, not draining, nothing broken.

    Create it inside the running loop. ``draining`` is a plain flag so a signal handler may set it.
    """

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.warmed_batch_sizes: list[int] = []
        self.warmed = False
        self.draining = False
        self.broken: BaseException | None = None
        # Lanes whose run has outlasted a whole deadline: each lane's description, for /readyz.
        self.stuck: dict[str, str] = {}
        self._warmed_event = asyncio.Event()

    def fail(self, error: BaseException) -> None:
        """A component died (the batching task): never report ready again; probes restart us."""
        self.broken = error

    def mark_warmed(self, batch_sizes: list[int]) -> None:
        self.warmed_batch_sizes = batch_sizes
        self.warmed = True
        self._warmed_event.set()

    async def wait_warmed(self) -> None:
        await self._warmed_event.wait()

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining and self.broken is None

    def lane_stuck(self, lane: str, description: str | None) -> None:
        """A lane's run outlasted its deadline (``description``), or returned (None)."""
        if description is None:
            self.stuck.pop(lane, None)
        else:
            self.stuck[lane] = description

    def check_ready(self) -> None:
        """Admitting, and no lane stuck: a load balancer sends its traffic elsewhere meanwhile."""
        self.check_admitting()
        if self.stuck:
            raise NotReady("; ".join(self.stuck.values()), headers=self.retry_after)

    def check_admitting(self) -> None:
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down and admits no new work",
                headers=self.retry_after,
            )
        if self.broken is not None:
            raise NotReady(f"the server is broken: {self.broken!r}", headers=self.retry_after)
        if not self.warmed:
            raise NotReady("the model is still warming up", headers=self.retry_after)
