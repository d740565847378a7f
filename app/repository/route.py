"""Where a request goes (``Route``), and a rollout as one worker runs it (``Rollout``).

A request that names a version goes to it. One that names none goes to the model's served
version, or, while a rollout runs (docs/rollouts.md):

- canary: to the candidate for ``percent`` of the requests (by a caller's key, or its address,
  when ``sticky``: a hash every worker computes alike, so a caller sees one version whichever
  worker answers); a candidate's server error is answered again by the baseline, so a client
  never sees a broken candidate fail;
- shadow: to the baseline, and a copy of its crops to the candidate.

Comparisons (a canary's answers run again on the baseline, a shadow's copies) are work no client
waits for: they start after the client's answer is computed, are not admitted, and run only
within ``compare_share`` of the compute (each costed at the version's warm-up timings) and two
at a time; the rest are dropped and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from app.pipeline.heads import Head, Row
from app.pipeline.pipeline import Image, Tap
from app.repository.rollout import Mode, Plan, Role, Tally
from app.repository.version import ServedModel
from app.telemetry.metrics import Metrics
from core.contract import OUTPUT_NAME, ModelMetadata
from core.errors import ServiceError

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[ServedModel, Head[T], Tap | None], Awaitable[list[T]]]
HeadFor = Callable[[ModelMetadata], Head[T]]
COMPARING_AT_ONCE = 2  # comparisons in flight per rollout: a few, never a queue
STICKY_BUCKETS = 10_000


class Rollout:
    """One worker's side of a rollout: which version each request goes to, the comparisons,
    and what it saw (``pending``, taken by whoever judges: app.repository.models)."""

    def __init__(
        self,
        plan: Plan,
        baseline: ServedModel,
        candidate: ServedModel,
        metrics: Metrics,
        on_tally: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.baseline = baseline
        self.candidate = candidate
        self.routing = True  # False from the moment it ends: every request to the baseline's
        self.pending = Tally()
        self._on_tally = on_tally
        self._count = 0
        self._budget = Budget(plan.compare_share)
        self._comparing = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # The candidate's probabilities in the baseline's class order (checked: same classes).
        labels = candidate.metadata.labels
        self._order = np.array([labels.index(label) for label in baseline.metadata.labels])
        self.same_recipe = baseline.metadata.recipe == candidate.metadata.recipe
        self._metrics = metrics
        name = plan.model
        self._requests = {
            role: metrics.rollout_requests.labels(name, self.version(role), role.value)
            for role in Role
        }
        self._errors = {
            role: metrics.rollout_errors.labels(name, self.version(role), role.value)
            for role in Role
        }

    def version(self, role: Role) -> str:
        return self.plan.baseline if role is Role.BASELINE else self.plan.candidate

    def served(self, role: Role) -> ServedModel:
        return self.baseline if role is Role.BASELINE else self.candidate

    def pick(self, who: str) -> Role:
        """The role that answers the next request naming no version; ``who``: its caller's
        identity (a key's digest, or a client address), for a sticky canary."""
        plan = self.plan
        if not self.routing or plan.mode is Mode.SHADOW:
            return Role.BASELINE
        if plan.sticky:
            key = f"{plan.ident}\0{who}".encode()
            bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) % STICKY_BUCKETS
            return Role.CANDIDATE if bucket < plan.percent * STICKY_BUCKETS / 100 else Role.BASELINE
        # Evenly spread, exactly percent in every hundred: a request is the candidate's when it
        # takes the running count of candidate answers to the next whole number.
        before = self._count * plan.percent // 100
        self._count += 1
        return Role.CANDIDATE if self._count * plan.percent // 100 > before else Role.BASELINE

    def answered(self, role: Role, seconds: float, failed: bool) -> None:
        self.pending.answered(role, seconds, failed)
        self._requests[role].inc()
        if failed:
            self._errors[role].inc()
        self._on_tally()

    def tap(self, role: Role, images: Sequence[Image] | None) -> Tap | None:
        """What compares a request's answer, where it is one to compare: a canary's answered by
        the candidate, every one of a shadow's (its copy)."""
        if not self.routing or role is not self._compared_role:
            return None

        def tapped(crops: Sequence[np.ndarray], rows: Sequence[Row]) -> None:
            self._compare_later(role, images, crops, rows)

        return tapped

    @property
    def _compared_role(self) -> Role:
        return Role.CANDIDATE if self.plan.mode is Mode.CANARY else Role.BASELINE

    def _compare_later(
        self,
        role: Role,
        images: Sequence[Image] | None,
        crops: Sequence[np.ndarray],
        rows: Sequence[Row],
    ) -> None:
        other = Role.BASELINE if role is Role.CANDIDATE else Role.CANDIDATE
        served = self.served(other)
        same = self.same_recipe
        cost = compute_seconds(served, len(crops))
        if (
            (not same and images is None)  # crops of another size, and no image to decode
            or self._comparing >= COMPARING_AT_ONCE
            or not self._budget.take(cost)
        ):
            self.pending.dropped += 1
            self._metrics.rollout_dropped.labels(self.plan.model).inc()
            self._on_tally()
            return
        primary = np.stack([row[OUTPUT_NAME] for row in rows])
        self._comparing += 1
        task = asyncio.get_running_loop().create_task(
            self._compare(role, other, crops if same else None, images or [], primary)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(
        self,
        role: Role,
        other: Role,
        crops: Sequence[np.ndarray] | None,
        images: Sequence[Image],
        primary: np.ndarray,
    ) -> None:
        served = self.served(other)
        started = time.perf_counter()
        copy = self.plan.mode is Mode.SHADOW  # the candidate's only work: its figures
        try:
            with served.hold():
                probabilities = await served.pipeline.probabilities(crops, images)
        except Exception as exc:
            failed = not isinstance(exc, ServiceError) or exc.status_code == 500
            if copy and failed:
                self.answered(other, time.perf_counter() - started, failed=True)
            elif not isinstance(exc, ServiceError):
                log.warning("rollout comparison failed", exc_info=True)
            return
        finally:
            self._comparing -= 1
        if copy:
            self.answered(other, time.perf_counter() - started, failed=False)
        baseline, candidate = (
            (probabilities, primary)
            if other is Role.BASELINE
            else (
                primary,
                probabilities,
            )
        )
        candidate = candidate[:, self._order]
        agreeing = int((baseline.argmax(1) == candidate.argmax(1)).sum())
        difference = float(np.abs(baseline - candidate).max(1).sum())
        self.pending.compare(len(baseline), agreeing, difference)
        self._metrics.rollout_compared.labels(self.plan.model).inc(len(baseline))
        self._metrics.rollout_agreeing.labels(self.plan.model).inc(agreeing)
        self._on_tally()

    def take(self) -> Tally:
        """What was seen since the last take."""
        taken, self.pending = self.pending, Tally()
        return taken


def compute_seconds(served: ServedModel, images: int) -> float:
    """What ``images`` cost ``served``, from its warm-up's timed runs (the machine to itself):
    the smallest timed batch that holds them. Its batches' times under load would count the
    wait for the cores that the serving version keeps busy, several times the work itself."""
    timed = served.batch_seconds
    fitting = [size for size in timed if size >= images]
    if fitting:
        return timed[min(fitting)]
    if timed:
        largest = max(timed)
        return timed[largest] * images / largest
    return (served.estimate.seconds_per_image or 0.0) * images


class Budget:
    """Seconds of compute comparisons may start: ``share`` of every second, at most one
    second's worth saved up. A comparison starts while some is left, and its cost is taken
    after, so one larger than the allowance still runs, then waits it off."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.left = share
        self.at = time.monotonic()

    def take(self, cost: float) -> bool:
        now = time.monotonic()
        self.left = min(self.share, self.left + (now - self.at) * self.share)
        self.at = now
        if self.left <= 0:
            return False
        self.left -= cost
        return True


class Route:
    """One request's way: the version that answers it (``served``, after the answer the one
    that did), and the rollout it is part of, if any."""

    def __init__(
        self, served: ServedModel, rollout: Rollout | None = None, role: Role | None = None
    ) -> None:
        self.served = served
        self.rollout = rollout
        self.role = role

    @contextmanager
    def hold(self) -> Iterator[Route]:
        with self.served.hold():
            yield self

    async def images(
        self, images: Sequence[Image], head: Head[T], head_for: HeadFor[T] | None = None
    ) -> list[T]:
        """The head's answer for each image. ``head_for``: the head for another version's
        metadata, for a baseline answering what a canary failed (None: no second answer)."""

        def work(served: ServedModel, head: Head[T], tap: Tap | None) -> Awaitable[list[T]]:
            return served.pipeline.images(images, head, tap)

        return await self._answer(work, head, head_for, images)

    async def crops(
        self, crops: Sequence[np.ndarray], head: Head[T], head_for: HeadFor[T] | None = None
    ) -> list[T]:
        """As ``images``, for crops made by the served version's recipe."""

        def work(served: ServedModel, head: Head[T], tap: Tap | None) -> Awaitable[list[T]]:
            return served.pipeline.crops(crops, head, tap)

        rollout = self.rollout
        same = rollout is not None and rollout.same_recipe
        return await self._answer(work, head, head_for if same else None, None)

    async def _answer(
        self,
        work: Work[T],
        head: Head[T],
        head_for: HeadFor[T] | None,
        images: Sequence[Image] | None,
    ) -> list[T]:
        rollout, role = self.rollout, self.role
        if rollout is None or role is None:
            return await work(self.served, head, None)
        started = time.perf_counter()
        try:
            answers = await work(self.served, head, rollout.tap(role, images))
        except Exception as exc:
            status = exc.status_code if isinstance(exc, ServiceError) else 500
            if status != 500:  # the request's or the load's doing, not the version's
                raise
            rollout.answered(role, time.perf_counter() - started, failed=True)
            if role is not Role.CANDIDATE or head_for is None:
                raise
            log.warning(
                "the candidate failed a request; the baseline answers it",
                extra={"model": rollout.plan.model, "version": rollout.plan.candidate},
            )
            baseline = rollout.baseline
            with baseline.hold():
                self.served, self.role = baseline, Role.BASELINE
                return await work(baseline, head_for(baseline.metadata), None)
        rollout.answered(role, time.perf_counter() - started, failed=False)
        return answers
