"""What a worker and its supervisor (app.process.workers) say over the worker's pipe: the worker
has started, and the model repository changes every worker applies.

A repository load or unload asked of one worker is relayed: the worker sends it to the
supervisor, which sends it to every worker, the asking one included, and answers the asking one
with every started worker's outcome. Each worker applies the changes in the order the
supervisor sent them, so all end in the same state. The supervisor keeps the last change of each
model and sends them to a worker it starts later (a replacement), which applies them before it
accepts a connection.

Rollouts (app.repository.rollout) go the same way: their start and end are changes. Each worker
sends what it saw of a rollout (a ``tally``) every ``TALLY_INTERVAL_S``; the supervisor judges
the sum, sends every worker the rollback a failing candidate gets, and answers the state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

from app.errors import GivenStatus
from app.repository.rollout import Plan
from core.errors import ServiceError

log = logging.getLogger(__name__)

STARTED = "started"
TALLY_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Change:
    """A repository change: ``load`` (to ``policy``, a VersionPolicy's text; None: the
    server's) or ``unload``; or, with its ``plan``, a rollout's start (``rollout``) or end (a
    rollout Status: ``promoted``, ``stopped``, ``rolled_back`` with its ``reason``).
    ``counted``: this worker counts the end in the metrics (one of them does)."""

    action: str
    name: str
    policy: str | None = None
    plan: Plan | None = None
    reason: str = ""
    counted: bool = False


@dataclass(frozen=True)
class Outcome:
    """One worker's result: the versions that failed to load, with why, or the error that
    refused the change (its status, code and message)."""

    worker: int | None
    failed: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[int, str, str] | None = None


def raise_refusal(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.error is not None:
            raise GivenStatus(*outcome.error)  # the first refusal, raised again here


Apply = Callable[[Change], Awaitable[list[tuple[str, str]]]]


class WorkerLink:
    """The worker's end of the pipe. A thread reads it: a change from the supervisor is applied
    on the event loop (held until ``attach``, so a starting worker applies what it missed first);
    EOF means the supervisor is gone, and the worker drains and exits."""

    def __init__(self, conn: Connection, worker: int) -> None:
        self.conn = conn
        self.worker = worker
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._early: list[tuple[int | None, Change]] = []
        self._apply: Apply | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asked: dict[int, asyncio.Future[object]] = {}
        self._ids = itertools.count()

    def start(self) -> None:
        threading.Thread(target=self._read, name="supervisor-link", daemon=True).start()

    def send(self, message: object) -> None:
        with self._send_lock:
            self.conn.send(message)

    async def attach(self, apply: Apply) -> None:
        """From here on, changes are applied as they come; those that came before first."""
        self._loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if not self._early:
                    self._apply = apply
                    return
                ident, change = self._early.pop(0)
            await self._run(apply, ident, change)

    async def relay(self, change: Change) -> list[Outcome]:
        """Every started worker's outcome of ``change``, this one's included."""
        return cast(list[Outcome], await self.ask("relay", change))

    async def ask(self, kind: str, body: object) -> object:
        """The supervisor's answer: to a ``relay``, or a ``rollout`` state (its judge's, or
        None where the model has had none)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        ident = next(self._ids)
        with self._lock:
            self._asked[ident] = future
        self.send((kind, ident, body))
        return await future

    def _read(self) -> None:
        while True:
            try:
                kind, ident, body = self.conn.recv()
            except (EOFError, OSError):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                self._on_message(kind, ident, body)
            except Exception:  # this thread must outlive a bad message: it watches the supervisor
                log.exception("message from the supervisor not handled", extra={"kind": kind})

    def _on_message(self, kind: str, ident: int | None, body: object) -> None:
        if kind == "apply":
            assert isinstance(body, Change)
            self._schedule(ident, body)
        elif kind == "done":
            with self._lock:
                future = self._asked.pop(ident, None) if ident is not None else None
            if future is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(future.set_result, body)

    def _schedule(self, ident: int | None, change: Change) -> None:
        with self._lock:
            apply, loop = self._apply, self._loop
            if apply is None or loop is None:
                self._early.append((ident, change))
                return
        asyncio.run_coroutine_threadsafe(self._run(apply, ident, change), loop)

    async def _run(self, apply: Apply, ident: int | None, change: Change) -> None:
        try:
            outcome = Outcome(self.worker, failed=await apply(change))
        except ServiceError as exc:
            outcome = Outcome(self.worker, error=(exc.status_code, exc.code, exc.message))
        except Exception as exc:  # reported to the asking worker, which answers 500
            log.exception("repository change failed", extra={"model": change.name})
            outcome = Outcome(self.worker, error=(500, "internal_error", str(exc)))
        if ident is not None:
            self.send(("applied", ident, outcome))
        elif outcome.error is not None:
            log.warning(
                "repository change not applied",
                extra={"model": change.name, "action": change.action, "reason": outcome.error[2]},
            )
