"""Admission by predicted wait and buffered bytes, not by a count of open requests.

A request is admitted while the work already admitted, each image at its model version's measured
cost (a ``CostEstimate`` per served version), would let it finish inside ``request_timeout_ms``.
Otherwise it waits at the door, without its body being read, for at most ``admission_wait_ms``,
and is shed (503) if no room opens; when room opens, waiting callers are let in in turn
(app.batching.fair), so one caller's crowd at the door does not shut another out. Uploads hold
almost nothing: they are bounded by the bytes they have actually buffered and by
``upload_timeout_ms``, so clients trickling bytes cannot starve honest ones.

With a latency target (``latency_target_ms``) the door also learns how many images may be in
flight before work misses the target more than once in a hundred (``DepthLimit``), and refuses
at once (503) what would go past it, instead of letting it queue: under overload the
requests answered stay fast and the excess is told to come back, where without a target
everything admitted waits its turn up to ``request_timeout_ms``.

Readiness (``Lifecycle``) is the first thing the door asks: warmed up, not draining, nothing
broken.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

from app.batching.deadline import remaining_s
from app.batching.fair import Shares
from app.edge.requests import Caller, Priority, caller
from app.errors import DeadlineExceeded, NotReady, Overloaded, ShuttingDown
from app.telemetry.metrics import Metrics

# The request's admission at the door, where it came through one (set by ``with ticket:``).
admitted: ContextVar[Ticket | None] = ContextVar("resnet_serve_ticket", default=None)
# How long an admitted request counts before its body is in (see Ticket).
PROVISIONAL_S = 1.0
# Admit only what the model alone would finish in this share of the deadline: decoding and
# scheduling take the rest (at 1.0, admitted requests got 504 under overload: docs/reliability.md).
HEADROOM = 0.8
# Weight of the newest batch in the per-image cost estimate: follows a load change within
# a few batches without jumping on one slow batch.
EWMA_WEIGHT = 0.2


@dataclass(frozen=True)
class AdmissionConfig:
    request_timeout_ms: float
    admission_wait_ms: float
    max_buffered_bytes: int
    latency_target_ms: float | None = None  # the p99 time in the server to keep to, if any


class CostEstimate:
    """Seconds of model time per image of one served model version, learned from its batches."""

    def __init__(self) -> None:
        self.seconds_per_image: float | None = None  # None until the model has run

    def observe_batch(self, images: int, seconds: float) -> None:
        cost = seconds / images
        previous = self.seconds_per_image
        self.seconds_per_image = (
            cost if previous is None else previous + EWMA_WEIGHT * (cost - previous)
        )


class DepthLimit:
    """The most images in flight (a newcomer's own included: its "depth") at which work still
    keeps to the latency target 99 times in 100, learned from the work that comes in near it:
    each one that misses the target (from its body in to its answer out) lowers the limit by one
    image, each one that keeps to it raises the limit by 1/99 of one, so the limit settles where
    1% miss (a running quantile). Measured whole, it holds whatever the front end, the decode or
    the model costs, and follows the machine as it gets busier or quieter.
    """

    MISS_SHARE = 0.01  # the share of work allowed past the target: a p99
    START = 8.0  # before anything is learned: a batch's worth on a CPU

    def __init__(self, target_s: float) -> None:
        self.target_s = target_s
        self.images = self.START

    def observe(self, depth: int, seconds: float) -> None:
        if depth < self.images - 1:  # well inside the limit: says nothing about it
            return
        if seconds > self.target_s:
            self.images = max(1.0, self.images - 1)
        else:
            self.images += self.MISS_SHARE / (1 - self.MISS_SHARE)

    def allows(self, depth: int) -> bool:
        return depth <= self.images


class Lifecycle:
    """Readiness: warmed up, not draining, nothing broken.

    Create it inside the running loop. ``draining`` is a plain flag so a signal handler may set it.
    """

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.warmed = False
        self.draining = False
        self.broken: BaseException | None = None
        # Lanes whose run has outlasted a whole deadline: each lane's description, for /readyz.
        self.stuck: dict[str, str] = {}
        self._warmed_event = asyncio.Event()

    def fail(self, error: BaseException) -> None:
        """A component died (the batching task): never report ready again; probes restart us."""
        self.broken = error

    def mark_warmed(self) -> None:
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


class Admission:
    """One per process: every served version's admitted work shares the cores and the deadline."""

    def __init__(self, config: AdmissionConfig, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.pending_images = 0  # admitted with their bytes read, not finished yet
        # The same images by the version they go to (None: a version not known yet), each
        # counted at its version's current cost: the estimates move as batches are measured.
        # ...and by the priority of their callers: a request waits only for the work of its own
        # priority and higher (every queue serves them first: app.batching.fair).
        self._pending: Counter[tuple[Priority, CostEstimate | None]] = Counter()
        self.provisional = 0  # admitted at the door, body still coming: one image each
        self._provisional_by = [0] * len(Priority)
        self.buffered_bytes = 0  # request bodies being received, all requests together
        self.estimates: set[CostEstimate] = set()  # of the versions being served
        # Requests waiting to be let in, by caller: callers in turn, each in arrival order.
        self._door: dict[str, tuple[Caller, deque[asyncio.Future[Ticket]]]] = {}
        self._door_waiting = 0
        self.shares = Shares(time.monotonic)
        target_ms = config.latency_target_ms
        self.depth_limit = DepthLimit(target_ms / 1000) if target_ms is not None else None
        metrics.track(metrics.pending_images, lambda: self.pending_images)
        metrics.track(metrics.buffered_bytes, lambda: self.buffered_bytes)
        metrics.track(metrics.door_waiting, lambda: self._door_waiting)

    @property
    def admitted_images(self) -> int:
        """Images admitted and not finished: bodies read, plus one per body still coming."""
        return self.pending_images + self.provisional

    def door_cost(self) -> float:
        """What a body still coming counts, before its model is known: the dearest version's
        image, so that the door never lets in more than the slowest model could finish."""
        known = [e.seconds_per_image for e in self.estimates if e.seconds_per_image is not None]
        return max(known, default=0.0)

    @property
    def pending_seconds(self) -> float:
        """Model time of the images admitted and not finished, at their versions' costs now."""
        return sum(count * self._cost(estimate) for (_, estimate), count in self._pending.items())

    def predicted_wait_s(
        self,
        images: int = 1,
        estimate: CostEstimate | None = None,
        priority: Priority = Priority.LOW,
    ) -> float:
        """Until ``images`` more of ``estimate``'s version, sent by a caller of ``priority``,
        would be done: the work admitted of that priority and higher, and their own."""
        pending = sum(
            count * self._cost(version)
            for (of, version), count in self._pending.items()
            if of <= priority
        )
        provisional = sum(self._provisional_by[: priority + 1])
        return pending + provisional * self.door_cost() + images * self._cost(estimate)

    def _cost(self, estimate: CostEstimate | None) -> float:
        if estimate is None or estimate.seconds_per_image is None:
            return self.door_cost()
        return estimate.seconds_per_image

    async def enter(self) -> Ticket:
        """Admit a request before its body is read, waiting at the door while it would be late.

        A request that cannot be admitted within ``admission_wait_ms`` gets 503. Waiting costs
        no CPU, and it paces clients that retry at once, where refusing at once would turn
        them into a storm of refusals that takes the CPU the admitted work needs.
        """
        self.lifecycle.check_admitting()
        if self.buffered_bytes >= self.config.max_buffered_bytes:
            raise self._shed(
                "upload_buffers",
                f"{self.buffered_bytes} bytes of uploads are buffered, the limit is "
                f"max_buffered_bytes={self.config.max_buffered_bytes}",
            )
        who = caller.get()
        left_s = remaining_s()
        if left_s is not None and self.predicted_wait_s(1, None, who.priority) > left_s:
            self.metrics.admission_wait_seconds.observe(0.0)
            raise self._past_deadline(left_s)
        if self._door:
            self.open_door()  # whoever may go in now goes first
        if who.identity not in self._door and self._fits(1, None, who) and self._allows(who):
            self.metrics.admission_wait_seconds.observe(0.0)
            return self._let_in(who)
        if not self._meets_target(1):  # refused now: waiting would only make it later
            self.metrics.admission_wait_seconds.observe(0.0)
            raise self._late(1)
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[Ticket] = loop.create_future()
        arrived = loop.time()
        self._door.setdefault(who.identity, (who, deque()))[1].append(turn)
        self._door_waiting += 1
        wait_ms = self.config.admission_wait_ms
        if self.config.latency_target_ms is not None:  # a wait is time the target counts too
            wait_ms = min(wait_ms, self.config.latency_target_ms)
        own = left_s is not None and left_s * 1000 < wait_ms
        if left_s is not None and own:
            wait_ms = left_s * 1000
        try:
            async with asyncio.timeout(wait_ms / 1000):
                await turn
        except TimeoutError:
            if turn.done() and not turn.cancelled():  # let in as the clock ran out
                return turn.result()
            if own:
                raise self._past_deadline(0.0) from None
            if self._fits(1, None, who):  # there was room: its caller's share was not
                raise self._unfair(who) from None
            raise self._late(1) from None
        finally:
            self.metrics.admission_wait_seconds.observe(loop.time() - arrived)
        return turn.result()

    @contextmanager
    def work(self, images: int, estimate: CostEstimate | None = None) -> Iterator[None]:
        """Hold ``images`` of the version ``estimate`` learns about in the predicted wait while
        they are decoded, queued and computed; the request's ticket (``admitted``), if it came
        through the door, gives its place to them."""
        self.lifecycle.check_admitting()
        ticket = admitted.get()
        if ticket is not None:
            ticket.spend()
        who = caller.get()
        if not self._fits(images, estimate, who):
            raise self._late(images, estimate)
        depth = self.admitted_images + images
        started = time.monotonic()
        self.pending_images += images
        self._pending[who.priority, estimate] += images
        self.shares.take(who, images)
        try:
            yield
            # Only work that succeeded is learned from: a failure says nothing of its time.
            if ticket is None:
                self.learn(depth, time.monotonic() - started)
            else:  # learned once the answer is sent: its head and its bytes take time too
                ticket.worked = (depth, started)
        finally:
            self.shares.give_back(who, images)
            self.pending_images -= images
            self._pending[who.priority, estimate] -= images
            if not self._pending[who.priority, estimate]:
                del self._pending[who.priority, estimate]
            self.open_door()

    @contextmanager
    def buffering(self) -> Iterator[BufferAccount]:
        account = BufferAccount(self)
        try:
            yield account
        finally:
            self.buffered_bytes -= account.held

    def open_door(self) -> None:
        """Let waiting requests in while they fit: higher priorities first, and within one,
        callers in turn, each in arrival order, a caller over its share (``Shares``) passed over
        while others compete."""
        while self._door:
            admitted = False
            # Sorting is stable: within a priority the callers keep their turns.
            waiting = sorted(self._door.items(), key=lambda item: item[1][0].priority)
            for identity, (who, turns) in waiting:
                while turns and turns[0].done():  # gave up waiting
                    turns.popleft()
                    self._door_waiting -= 1
                if not turns:
                    del self._door[identity]
                    continue
                if not self._fits(1, None, who):  # nor will anyone's after it: sorted
                    return
                if not self._allows(who):
                    continue
                self._door_waiting -= 1
                turns.popleft().set_result(self._let_in(who))
                admitted = True
                # Its turn is over: to the back of the line (or gone, if nothing else waits).
                del self._door[identity]
                if turns:
                    self._door[identity] = (who, turns)
            if not admitted:
                return

    def _let_in(self, who: Caller) -> Ticket:
        self.provisional += 1
        self._provisional_by[who.priority] += 1
        self.shares.take(who, 1)
        return Ticket(self, who)

    def _allows(self, who: Caller) -> bool:
        return self.shares.allows(who, self._waiting_callers)

    def _waiting_callers(self) -> Iterator[Caller]:
        return (who for who, _ in self._door.values())

    def _fits(
        self, images: int, estimate: CostEstimate | None = None, who: Caller | None = None
    ) -> bool:
        """Within the deadline (for ``who``: after the work of its priority and higher; without
        one, after all) and the latency target."""
        priority = who.priority if who is not None else Priority.LOW
        return self._meets_deadline(images, estimate, priority) and self._meets_target(images)

    def _meets_deadline(
        self, images: int, estimate: CostEstimate | None, priority: Priority
    ) -> bool:
        budget_s = HEADROOM * self.config.request_timeout_ms / 1000
        return self.predicted_wait_s(images, estimate, priority) <= budget_s

    def _meets_target(self, images: int) -> bool:
        """Within the latency target's depth limit, if there is one; a request with the server
        to itself always is (a target below what one request costs would refuse them all)."""
        if self.depth_limit is None or not self.admitted_images:
            return True
        return self.depth_limit.allows(self.admitted_images + images)

    def learn(self, depth: int, seconds: float) -> None:
        """Work that came in at ``depth`` took ``seconds`` in the server."""
        if self.depth_limit is not None:
            self.depth_limit.observe(depth, seconds)

    def _late(self, images: int, estimate: CostEstimate | None = None) -> Overloaded:
        if not self._meets_target(images):
            assert self.depth_limit is not None
            return self._shed(
                "latency_target",
                f"{self.admitted_images} image(s) ahead: at {self.depth_limit.images:.1f} "
                f"images in flight, 1% of work already misses latency_target_ms="
                f"{self.config.latency_target_ms:g}",
            )
        return self._shed(
            "predicted_wait",
            f"predicted wait {self.predicted_wait_s(images, estimate) * 1000:.4g} ms for "
            f"{self.admitted_images} image(s) ahead does not fit "
            f"request_timeout_ms={self.config.request_timeout_ms:g} "
            f"(waited admission_wait_ms={self.config.admission_wait_ms:g} for room)",
        )

    def _past_deadline(self, left_s: float) -> DeadlineExceeded:
        """504 at the door: the request's own deadline cannot be met, so its body is never read
        (a 503 would invite a retry that the client has no time left for)."""
        self.metrics.deadline_dropped.labels("door").inc()
        predicted = self.predicted_wait_s(1) * 1000
        return DeadlineExceeded(
            f"the request's own deadline leaves {max(left_s, 0) * 1000:.4g} ms and the predicted "
            f"wait is {predicted:.4g} ms for {self.admitted_images} image(s) ahead: not admitted"
        )

    def _unfair(self, who: Caller) -> Overloaded:
        held = self.shares.held.get(who.identity, 0)
        return self._shed(
            "fair_share",
            f"this caller holds {held} of the {self.admitted_images} image(s) admitted, its "
            f"share while other callers compete (waited admission_wait_ms="
            f"{self.config.admission_wait_ms:g} for room)",
        )

    def _shed(self, reason: str, message: str) -> Overloaded:
        self.metrics.rejected.labels(reason=reason).inc()
        return Overloaded(message, headers=self.lifecycle.retry_after)


class Ticket:
    """A request admitted at the door, counted as one image until its body is in.

    An honest upload finishes well inside ``PROVISIONAL_S``; one still trickling in after that
    stops counting, so slow clients cannot hold the room that honest ones need. ``with ticket:``
    around the request's handling makes it the request's (``admitted``) and releases it after.
    """

    def __init__(self, admission: Admission, who: Caller) -> None:
        self._admission = admission
        self._who = who
        self._held = True
        self._expiry = asyncio.get_running_loop().call_later(PROVISIONAL_S, self.release)
        self._token: Token[Ticket | None] | None = None
        # Set by ``Admission.work`` when the request's work succeeded: its depth and when it
        # began, learned from (``DepthLimit``) as the request ends.
        self.worked: tuple[int, float] | None = None

    def spend(self) -> None:
        """The request's own images take the place it held (no door opens in between)."""
        if self._held:
            self._held = False
            self._expiry.cancel()
            self._admission.provisional -= 1
            self._admission._provisional_by[self._who.priority] -= 1
            self._admission.shares.give_back(self._who, 1)

    def release(self) -> None:
        if self._held:
            self.spend()
            self._admission.open_door()

    def __enter__(self) -> Ticket:
        self._token = admitted.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            admitted.reset(self._token)
        self.release()
        if self.worked is not None:
            depth, started = self.worked
            self._admission.learn(depth, time.monotonic() - started)


class BufferAccount:
    """The bytes one request body has put in memory so far."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = 0

    def add(self, size: int) -> None:
        admission = self._admission
        self.held += size
        admission.buffered_bytes += size
        limit = admission.config.max_buffered_bytes
        # The first request always proceeds, however large: the limit sheds the excess, not all.
        if admission.buffered_bytes > limit and admission.buffered_bytes > self.held:
            raise admission._shed(
                "upload_buffers",
                f"uploads in flight hold {admission.buffered_bytes} bytes, over "
                f"max_buffered_bytes={limit}",
            )
