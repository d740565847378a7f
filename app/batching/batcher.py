"""Dynamic batching between the HTTP handlers and the model.

Bounded; first come first served within a caller, callers in turn (app.batching.fair). A batch
closes when it holds ``limit`` images (``max_batch_size`` until warm-up fits it, kept short enough
for a latency target as runs are timed: app.batching.limit) or when its oldest image has waited
``max_wait_ms``.
Batches compute on lanes (app.batching.lanes), so the event loop keeps accepting and decoding
while a batch computes. A batch is collected only when a lane is free: an idle model runs what
is queued now, and batches grow while the lanes are busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from opentelemetry.trace import SpanContext, format_trace_id
from prometheus_client import Counter

from app.batching.fair import ACTIVE_S, FairQueue
from app.batching.lanes import Inline, Lanes
from app.batching.limit import fit_batch_limit, run_seconds, target_limit
from app.batching.spans import BatchSpans
from app.batching.watchdog import Watchdog
from app.edge.requests import Priority, caller
from app.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from app.telemetry.metrics import VersionMetrics
from app.telemetry.tracing import NO_TRACING, Tracing, current, now_ns
from core.contract import CLASSIFY
from core.errors import ServiceError

log = logging.getLogger(__name__)

# A batch of images, the outputs wanted and each image's class id for its map (or None) -> each
# named output, a row per image (app.runtimes.base.Backend.run).
Outputs = dict[str, np.ndarray]
ModelFn = Callable[[np.ndarray, frozenset[str], np.ndarray | None], Outputs]


# Weight of the newest run in a bucket's time (latency target): follows the load within a few
# batches without jumping on one slow run.
RUN_WEIGHT = 0.2
# While higher-priority work is about, a lower batch's run may take this many of a lone image's.
YIELD_RUNS = 1.5


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size`` images."""
    return next(bucket for bucket in buckets if bucket >= size)


@dataclass(eq=False)
class _Item:
    image: np.ndarray
    future: asyncio.Future[Outputs]  # the image's row of each output
    enqueued_at: float
    deadline: float
    # The request's sampled span, and when the image was queued (wall clock, for its spans).
    trace: SpanContext | None = None
    enqueued_ns: int = 0
    # What its request reads (a batch computes the union), and the class of its map (-1: top).
    outputs: frozenset[str] = CLASSIFY
    class_id: int = -1
    priority: Priority = Priority.NORMAL  # its caller's (app.batching.fair)


@dataclass(frozen=True)
class BatchConfig:
    """Built once from ``Settings`` (where the defaults live) by app.repository.configs."""

    max_batch_size: int
    # Shapes the model ever sees, ascending, the last == max_batch_size: a batch is padded with
    # zero images up to the next one (padding rows are dropped before anyone sees them).
    buckets: tuple[int, ...]
    max_wait_ms: float
    max_queue_images: int
    request_timeout_ms: float  # the deadline of work submitted without one
    retry_after_s: int
    # Batches computing at once, each on its own lane (app.batching.lanes), all on the one session:
    # on the CPU, runs on one core each side by side beat one run spread over all of them.
    concurrent_batches: int = 1
    # A lone batch runs on the event loop where its last run took under this (app.batching.lanes).
    inline_max_ms: float = 0.0
    # Where a bigger batch costs no less per image, batches stop at the first size whose run
    # takes this long (app.batching.limit); warm-up sets ``Batcher.limit``.
    flat_batch_ms: float = 0.0
    # The p99 time in the server to keep to: batches stay short enough for it (app.batching.limit).
    latency_target_ms: float | None = None


class Batcher:
    def __init__(
        self,
        model_fn: ModelFn,
        config: BatchConfig,
        metrics: VersionMetrics,
        *,
        on_failure: Callable[[BaseException], None] = lambda exc: None,
        on_batch: Callable[[int, float], None] = lambda images, seconds: None,
        alone_fn: ModelFn | None = None,
        admitted_images: Callable[[], int] = lambda: 0,
        tracing: Tracing = NO_TRACING,
        described: Mapping[str, str] | None = None,
        on_stuck: Callable[[str, str | None], None] = lambda lane, description: None,
    ) -> None:
        """Create inside the running loop (its queues belong to it).

        ``on_failure``: the batching task died. ``on_batch(images, seconds)``: a batch ran, its
        time shared among the batches running beside it (admission's cost estimate).
        ``alone_fn``: the model for a batch with the machine to itself, nothing else computing,
        queued or on its way (``admitted_images``: all images admitted upstream and not
        finished, this batch's included). ``described``: the batch spans' attributes (the
        model, its version, provider and precision). ``on_stuck(lane, description)``: a run
        has outlasted a whole ``request_timeout_ms`` (its requests got 504), or (None) returned.
        """
        self.model_fn = model_fn
        self.config = config
        self.metrics = metrics
        self.on_failure = on_failure
        self.on_batch = on_batch
        self.alone_fn = alone_fn
        self.admitted_images = admitted_images
        self.tracing = tracing
        described = dict(described or {})
        self.spans = BatchSpans(tracing, described)
        self.watchdog = Watchdog(config.request_timeout_ms, described, self.lane_label, on_stuck)
        self._lane_numbers: dict[ThreadPoolExecutor, int] = {}
        self._busy: dict[str, Counter] = {}  # each lane's busy-seconds counter, once looked up
        self.inline = Inline(config.inline_max_ms, batches=alone_fn is not None)
        self.lanes = Lanes(config.concurrent_batches)
        self.limit = config.max_batch_size  # the most images one batch takes
        self.fitted_limit = config.max_batch_size  # by the cost per image (warm-up's ``fit``)
        # Seconds of one run by bucket: warm-up's timings, then each lane's runs under load.
        self.run_seconds: dict[int, float] = {}
        self._queue: FairQueue[_Item] = FairQueue(config.max_queue_images)
        self._computing = 0  # batches between collection and fan-out
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failed: BaseException | None = None
        self._collecting: list[_Item] = []
        self._running: dict[asyncio.Task[None], list[_Item]] = {}
        # Until when each priority counts as about: its last image queued, plus ACTIVE_S.
        self._about_until = [0.0] * len(Priority)
        metrics.track(queue_depth=self._queue.qsize, batch_limit=lambda: self.limit)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def alone(self, images: int) -> bool:
        """Whether ``images`` have the machine to themselves: nothing else computing or queued,
        and nothing admitted upstream beyond them (``admitted_images`` counts them too)."""
        return self._computing == 0 and self._queue.empty() and self.admitted_images() <= images

    def fit(self, seconds: Mapping[int, float]) -> None:
        """The batch limit from warm-up's timed runs (``seconds`` by batch size)."""
        self.run_seconds = dict(seconds)
        self.fitted_limit = fit_batch_limit(seconds, self.config.flat_batch_ms)
        self._apply_target()

    def _observed(self, bucket: int, seconds: float) -> None:
        """A run of ``bucket`` as it happened, beside whatever else was running: the target's
        limit follows the runs' times as the load changes them."""
        previous = self.run_seconds.get(bucket)
        self.run_seconds[bucket] = (
            seconds if previous is None else previous + RUN_WEIGHT * (seconds - previous)
        )
        self._apply_target()

    def _apply_target(self) -> None:
        target_ms = self.config.latency_target_ms
        self.limit = self.fitted_limit
        if target_ms is not None and self.run_seconds:
            buckets = [b for b in self.config.buckets if b <= self.fitted_limit]
            self.limit = target_limit(self.run_seconds, buckets, target_ms)

    def _yielding_limit(self, limit: int) -> int:
        """The batch limit while higher-priority work is about: the largest bucket whose run
        takes at most YIELD_RUNS of the smallest's, so a lane soon frees for the higher work (on
        a CPU, where a batch costs about as much per image as a lone image, one image; on a GPU,
        where a batch of several takes about as long as one, several)."""
        if not self.run_seconds:
            return limit
        buckets = [b for b in self.config.buckets if b <= limit]
        lone = run_seconds(self.run_seconds, buckets[0])
        fitting = [b for b in buckets if run_seconds(self.run_seconds, b) <= YIELD_RUNS * lone]
        return max(fitting, default=buckets[0])

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._task.add_done_callback(self._watch)

    def _watch(self, task: asyncio.Task[None]) -> None:
        """If the loop or a batch ever dies, nobody would complete the queued futures: fail them."""
        stranded = list(self._running.pop(task, []))
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        assert error is not None
        if self._failed is None:
            self._failed = error
            log.error("the batching task died", exc_info=error)
            stranded += self._collecting
            stranded += (item for batch in self._running.values() for item in batch)
            while not self._queue.empty():
                stranded.append(self._queue.get_nowait())
                self._queue.task_done()
        for item in stranded:
            if not item.future.done():
                item.future.set_exception(InferenceFailed(f"the batching task died: {error!r}"))
        if self._failed is error:
            self.on_failure(error)

    async def submit(
        self,
        images: Sequence[np.ndarray],
        deadline: float | None = None,
        outputs: frozenset[str] = CLASSIFY,
        class_id: int = -1,
    ) -> list[Outputs]:
        """Each image's row of the model's ``outputs`` (and maybe others), in order; the images
        may be split across batches, and share them with other requests' images whatever each
        asks for.

        ``deadline`` (loop time): past it an image answers 504 instead of using the model;
        default ``request_timeout_ms`` from now. ``class_id``: the class of the images' maps
        (-1: each image's top class).
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.request_timeout_ms / 1000
        futures = self._enqueue(images, deadline, outputs, class_id)
        # Past the deadline an image still queued gets 504 when a lane takes it, and a stuck
        # run's after the watchdog's ``after_s``: this bound only matters when every lane is stuck.
        bound_s = max(0.0, deadline - loop.time()) + 2 * self.watchdog.after_s
        try:
            _, waiting = await asyncio.wait(
                futures, timeout=bound_s, return_when=asyncio.FIRST_EXCEPTION
            )
            if waiting and not any(f.done() and f.exception() for f in futures):
                raise DeadlineExceeded(
                    f"no lane computed the request's images within {bound_s:.3g} s: every "
                    "lane is busy or stuck"
                )
        finally:
            # Client gone or a sibling image failed: queued leftovers are dropped, not computed.
            for future in futures:
                future.cancel()
        # Retrieve every exception, not just the first, or asyncio logs the rest as unretrieved.
        errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
        if errors:
            raise errors[0]
        return [future.result() for future in futures]

    def _enqueue(
        self,
        images: Sequence[np.ndarray],
        deadline: float | None = None,
        outputs: frozenset[str] = CLASSIFY,
        class_id: int = -1,
    ) -> list[asyncio.Future[Outputs]]:
        if self._failed is not None:
            raise InferenceFailed(f"the batching task died: {self._failed!r}")
        if self._closing:
            raise ShuttingDown("the server is shutting down and admits no new work")
        free = self._queue.maxsize - self._queue.qsize()
        if len(images) > free:
            # All or nothing: a half-admitted request would compute images nobody gets back.
            raise Overloaded(
                f"queue full: {len(images)} image(s) do not fit, {free} of "
                f"max_queue_images={self._queue.maxsize} slots free",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is None:
            deadline = now + self.config.request_timeout_ms / 1000
        priority = caller.get().priority
        items = [
            _Item(
                image,
                loop.create_future(),
                now,
                deadline,
                outputs=outputs,
                class_id=class_id,
                priority=priority,
            )
            for image in images
        ]
        if self.tracing.on and (traced := current()) is not None:
            enqueued_ns = now_ns()
            for item in items:
                item.trace, item.enqueued_ns = traced, enqueued_ns
        for item in items:
            self._queue.put_nowait(item)
        self._about_until[priority] = now + ACTIVE_S
        return [item.future for item in items]

    async def drain(self) -> None:
        """Admit nothing new, finish everything queued or running, then stop."""
        self._closing = True
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._running, return_exceptions=True)
        self.lanes.shutdown()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lane = await self.lanes.take()
            if self._failed is not None:
                return
            self._collecting = batch = await self._collect()
            alone = self.alone(len(batch))
            self._computing += 1
            task = loop.create_task(self._process(lane, batch, alone), name="batch")
            self._running[task] = batch
            self._collecting = []
            task.add_done_callback(self._watch)

    async def _process(self, lane: ThreadPoolExecutor, batch: list[_Item], alone: bool) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        watchdog = self.watchdog
        watch = loop.call_later(watchdog.after_s, watchdog.stuck, lane, batch, started)
        try:
            live = self._admit(batch)
            if live:
                self._fan_out(live, await self._run(lane, live, alone))
        finally:
            watch.cancel()
            if lane in watchdog.stuck_lanes:
                watchdog.returned(lane, started)
            for _ in batch:
                self._queue.task_done()
            self._computing -= 1
            self.lanes.give_back(lane)

    async def _collect(self) -> list[_Item]:
        """A batch: the first item queued, and what joins it within ``max_wait_ms``, up to the
        limit. Lower priorities never join a batch of higher ones (the queue serves the higher
        first, so a batch of high work is only high work, as short as it can be); higher ones
        join any batch, which is the first to run."""
        first = await self._queue.get()
        batch = [first]
        close_at = first.enqueued_at + self.config.max_wait_ms / 1000
        loop = asyncio.get_running_loop()
        limit = self.limit
        if any(until > loop.time() for until in self._about_until[: first.priority]):
            limit = self._yielding_limit(limit)
        while len(batch) < limit:
            if not self._queue.empty():  # what is queued now joins without a timer
                if self._queue.next_priority() > first.priority:
                    break
                batch.append(self._queue.get_nowait())
                continue
            remaining = close_at - loop.time()
            if remaining <= 0:
                break
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop an item it got.
                async with asyncio.timeout(remaining):
                    await self._queue.ready()
            except TimeoutError:
                break
        return batch

    def _admit(self, batch: list[_Item]) -> list[_Item]:
        """Drop cancelled items and fail expired ones, before they cost model time."""
        now = asyncio.get_running_loop().time()
        live = []
        for item in batch:
            if item.future.done():
                continue
            if now >= item.deadline:
                waited_ms = (now - item.enqueued_at) * 1000
                self.metrics.queue_deadline_dropped.inc()
                item.future.set_exception(
                    DeadlineExceeded(
                        f"image waited {waited_ms:.0f} ms in the queue and is past its "
                        f"deadline (request_timeout_ms={self.config.request_timeout_ms:g}, or the "
                        "request's own timeout if sooner)"
                    )
                )
                continue
            exemplar = {"trace_id": format_trace_id(item.trace.trace_id)} if item.trace else None
            self.metrics.queue_wait_seconds.observe(now - item.enqueued_at, exemplar)
            live.append(item)
        return live

    async def _run(
        self, lane: ThreadPoolExecutor, batch: list[_Item], alone: bool
    ) -> Outputs | ServiceError:
        """The model's outputs for ``batch``, or the error that fails exactly this batch."""
        # Batches sharing the cores each take longer: admission needs the cost per image of the
        # whole pipeline, so a run's time is shared among the batches running beside it.
        sharing = max(1, self._computing)
        started = time.perf_counter()
        started_ns = now_ns() if self.tracing.on else 0
        size = bucket_for(len(batch), self.config.buckets)
        model_fn, inline = self.model_fn, False
        if alone and self.alone_fn is not None:
            model_fn, inline = self.alone_fn, self.inline.runs_batch(size)
        try:
            inputs = np.stack([item.image for item in batch])
            if size > len(batch):
                padding = np.zeros((size - len(batch), *inputs.shape[1:]), inputs.dtype)
                inputs = np.concatenate([inputs, padding])
            wanted = frozenset().union(*(item.outputs for item in batch))
            class_ids = None
            if any(item.class_id >= 0 for item in batch):
                class_ids = np.full(size, -1, dtype=np.int64)
                class_ids[: len(batch)] = [item.class_id for item in batch]
            if inline:  # nothing else is computing, queued or on its way
                outputs = model_fn(inputs, wanted, class_ids)
            else:
                outputs = await self.lanes.run(lane, model_fn, inputs, wanted, class_ids)
        except Exception as exc:
            log.exception("inference failed", extra={"batch_size": len(batch)})
            failed = InferenceFailed(f"inference failed for a batch of {len(batch)}: {exc!r}")
            if started_ns:
                label = self.lane_label(lane, inline)
                self.spans.record(label, batch, size, started_ns, failed.message)
            return failed
        counts = [len(outputs[name]) for name in outputs]
        wrong = [count for count in counts if count != size]
        if wrong or not counts:
            return InferenceFailed(
                f"model returned {wrong[0] if wrong else 0} outputs for a batch of {size} images"
            )
        lane_label = self.lane_label(lane, inline)
        if started_ns:
            self.spans.record(lane_label, batch, size, started_ns)
        seconds = time.perf_counter() - started
        busy = self._busy.get(lane_label)
        if busy is None:
            busy = self._busy[lane_label] = self.metrics.lane_busy(lane_label)
        busy.inc(seconds)
        if lane in self.watchdog.stuck_lanes and not inline:
            # Its requests were answered 504 long ago; its time says nothing of the next run's
            # (it would refuse everyone through admission's cost estimate).
            return _first(outputs, len(batch))
        if model_fn is self.alone_fn:
            self.inline.ran_batch(size, seconds)
        elif self.config.latency_target_ms is not None:
            self._observed(size, seconds)
        self.on_batch(len(batch), seconds / sharing)
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.padded_batch_size.observe(size)
        self.metrics.images.inc(len(batch))
        return _first(outputs, len(batch))

    def lane_label(self, lane: ThreadPoolExecutor, inline: bool = False) -> str:
        """The lane a batch ran on, for metrics and spans: its number, or "loop" (inline)."""
        if inline:
            return "loop"
        return str(self._lane_numbers.setdefault(lane, len(self._lane_numbers)))

    def _fan_out(self, batch: list[_Item], outputs: Outputs | ServiceError) -> None:
        for index, item in enumerate(batch):
            if item.future.done():  # cancelled while the batch ran
                continue
            if isinstance(outputs, ServiceError):
                # One exception object per waiter: each request raises and logs its own.
                item.future.set_exception(type(outputs)(outputs.message))
            else:
                item.future.set_result({name: rows[index] for name, rows in outputs.items()})


def _first(outputs: Outputs, images: int) -> Outputs:
    """The rows of the batch's own images: the padding's are dropped before anyone sees them."""
    return {name: rows[:images] for name, rows in outputs.items()}
