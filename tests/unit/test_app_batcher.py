from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from app.batching.batcher import BatchConfig, Batcher, ModelFn, Outputs, bucket_for
from app.edge.requests import Caller, Priority, caller
from app.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from app.telemetry.metrics import Metrics

pytestmark = pytest.mark.anyio


def image(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, dtype=np.uint8)


def echo(batch: np.ndarray) -> Outputs:
    """Fake model: the output for an image is its pixel value, so results can be traced."""
    return {"y": batch[:, 0, 0, 0].astype(np.float32).reshape(-1, 1)}


class Recorder:
    def __init__(self, fn: Callable[[np.ndarray], Outputs] = echo) -> None:
        self.fn = fn
        self.batches: list[list[int]] = []

    def __call__(self, batch: np.ndarray) -> Outputs:
        self.batches.append([int(v) for v in batch[:, 0, 0, 0]])
        return self.fn(batch)


def make_batcher(
    model: Callable[[np.ndarray], Outputs],
    alone_fn: Callable[[np.ndarray], Outputs] | None = None,
    admitted_images: Callable[[], int] = lambda: 0,
    **config: Any,
) -> Batcher:
    values: dict[str, Any] = {
        "max_batch_size": 4,
        "max_wait_ms": 0.0,
        "max_queue_images": 256,
        "request_timeout_ms": 10_000.0,
        "retry_after_s": 1,
    } | config
    values.setdefault("buckets", tuple(range(1, values["max_batch_size"] + 1)))
    metrics = Metrics()
    batcher = Batcher(
        _images_only(model),
        BatchConfig(**values),
        metrics.for_version("m", "1"),
        alone_fn=None if alone_fn is None else _images_only(alone_fn),
    )
    batcher.registry = metrics.registry  # type: ignore[attr-defined]
    batcher.admitted_images = admitted_images
    return batcher


def _images_only(model: Callable[[np.ndarray], Outputs]) -> ModelFn:
    """A fake model of the images alone, as a batcher's model (which also gets the outputs a
    batch wants and the class ids of its maps)."""

    def run(batch: np.ndarray, outputs: frozenset[str], class_ids: np.ndarray | None) -> Outputs:
        return model(batch)

    return run


async def test_a_batch_computes_the_outputs_its_requests_want_and_their_class_ids() -> None:
    calls: list[tuple[frozenset[str], list[int] | None]] = []

    def model(batch: np.ndarray, outputs: frozenset[str], class_ids: np.ndarray | None) -> Outputs:
        calls.append((outputs, None if class_ids is None else class_ids.tolist()))
        return {name: echo(batch)["y"] for name in outputs | {"probabilities"}}

    config = BatchConfig(
        max_batch_size=4,
        buckets=(4,),
        max_wait_ms=3_600_000,
        max_queue_images=16,
        request_timeout_ms=10_000,
        retry_after_s=1,
    )
    batcher = Batcher(model, config, Metrics().for_version("m", "1"))
    batcher.start()
    plain = batcher.submit([image(1)])
    embedded = batcher.submit([image(2)], outputs=frozenset({"embedding"}))
    mapped = batcher.submit([image(3)], outputs=frozenset({"class_map"}), class_id=7)
    alone = batcher.submit([image(4)])
    answers = await asyncio.gather(plain, embedded, mapped, alone)
    # One batch of the four, padded to none: the union of what they want, each image's class.
    assert calls == [(frozenset({"probabilities", "embedding", "class_map"}), [-1, -1, 7, -1])]
    assert [float(rows[0]["embedding"][0]) for rows in answers] == [1.0, 2.0, 3.0, 4.0]
    await batcher.drain()


async def test_full_batch_closes_without_waiting_for_the_deadline() -> None:
    batcher = make_batcher(echo, max_wait_ms=3_600_000)
    batcher._enqueue([image(v) for v in range(6)])
    batch = await batcher._collect()
    assert [int(item.image[0, 0, 0]) for item in batch] == [0, 1, 2, 3]
    assert batcher.depth == 2


async def test_partial_batch_closes_at_the_deadline() -> None:
    batcher = make_batcher(echo, max_wait_ms=20)
    loop = asyncio.get_running_loop()
    batcher._enqueue([image(1), image(2)])
    started = loop.time()
    batch = await batcher._collect()
    # It waited for company until its oldest image's deadline (a lower bound: never early),
    # then closed with what it had; what comes after goes into the next batch.
    assert loop.time() - started >= 0.020 - 1e-3
    assert [int(item.image[0, 0, 0]) for item in batch] == [1, 2]
    batcher._enqueue([image(3)])
    assert batcher.depth == 1


async def test_a_batch_of_high_priority_work_takes_no_lower_and_any_batch_takes_higher() -> None:
    batcher = make_batcher(echo, max_batch_size=4, max_wait_ms=3_600_000)
    high, low = Caller("key:h", "h", priority=Priority.HIGH), Caller("key:l", "l", Priority.LOW)

    def enqueue(who: Caller, *values: int) -> None:
        token = caller.set(who)
        batcher._enqueue([image(v) for v in values])
        caller.reset(token)

    enqueue(low, 1, 2, 3)
    enqueue(high, 9)
    # The high image goes first, alone: the low ones would make its run longer.
    assert [int(item.image[0, 0, 0]) for item in await batcher._collect()] == [9]
    batch = asyncio.ensure_future(batcher._collect())
    await asyncio.sleep(0.01)
    enqueue(high, 8)  # while a low batch waits for company: it joins, the first to run
    assert [int(item.image[0, 0, 0]) for item in await batch] == [1, 2, 3, 8]


@pytest.mark.parametrize(
    ("seconds", "yielding"),
    [
        ({1: 0.010, 2: 0.020, 4: 0.040}, 1),  # a CPU: a batch costs per image what one does
        ({1: 0.010, 2: 0.011, 4: 0.014}, 4),  # a GPU: four take about as long as one
    ],
)
async def test_while_higher_work_is_about_lower_batches_stay_short(
    seconds: dict[int, float], yielding: int
) -> None:
    # Batches as long as 35 ms where a bigger one is no cheaper: 4 images on both.
    batcher = make_batcher(echo, max_batch_size=4, max_wait_ms=0, flat_batch_ms=35)
    batcher.fit(seconds)
    assert batcher.limit == 4
    low = Caller("key:l", "l", priority=Priority.LOW)

    def low_batch() -> None:
        token = caller.set(low)
        batcher._enqueue([image(v) for v in range(4)])
        caller.reset(token)

    low_batch()
    assert len(await batcher._collect()) == 4  # nothing higher about: the whole limit
    batcher._enqueue([image(9)])  # the context's caller: normal, above low
    assert [int(item.image[0, 0, 0]) for item in await batcher._collect()] == [9]
    low_batch()
    assert len(await batcher._collect()) == yielding


async def test_fifo_order_and_results_across_requests() -> None:
    model = Recorder()
    batcher = make_batcher(model, max_batch_size=3, max_wait_ms=0)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit([image(1), image(2)]))
    second = asyncio.ensure_future(batcher.submit([image(3), image(4)]))
    results = await asyncio.gather(first, second)
    await batcher.drain()
    assert [[float(r["y"][0]) for r in result] for result in results] == [[1, 2], [3, 4]]
    assert [v for batch in model.batches for v in batch] == [1, 2, 3, 4]


async def test_multi_image_request_spans_batches_in_order() -> None:
    model = Recorder()
    batcher = make_batcher(model, max_batch_size=2, max_wait_ms=0)
    batcher.start()
    results = await batcher.submit([image(v) for v in (5, 6, 7, 8, 9)])
    await batcher.drain()
    assert [float(r["y"][0]) for r in results] == [5, 6, 7, 8, 9]
    assert max(len(batch) for batch in model.batches) == 2
    assert len(model.batches) >= 3


async def test_batches_stop_at_the_limit_warm_up_fitted() -> None:
    model = Recorder()
    batcher = make_batcher(model, max_batch_size=4, max_wait_ms=3_600_000)
    batcher.limit = 2  # as warm-up sets it
    batcher._enqueue([image(v) for v in range(5)])  # queued before the loop collects
    batcher.start()
    results = await batcher.submit([image(v) for v in range(5, 8)])
    await batcher.drain()
    assert [float(r["y"][0]) for r in results] == [5, 6, 7]
    assert [len(batch) for batch in model.batches] == [2, 2, 2, 2]


async def test_a_latency_target_shortens_batches_as_runs_slow_down() -> None:
    """A model whose run costs a known 4 ms per image: with an 80 ms target a batch may take
    20 ms, so all 4 images; once its runs take 12 ms per image (the machine got busy), only one
    image's run fits, and batches follow within a few runs."""
    per_image_s = [0.004]
    model = Recorder()

    def slow(batch: np.ndarray) -> Outputs:
        time.sleep(per_image_s[0] * len(batch))
        return model(batch)

    timed = {1: 0.004, 2: 0.008, 4: 0.016}  # as warm-up timed it
    batcher = make_batcher(slow, max_batch_size=4, latency_target_ms=80.0, flat_batch_ms=1e9)
    batcher.fit(timed)
    assert (batcher.fitted_limit, batcher.limit) == (4, 4)
    batcher.fit({**timed, 4: 0.024})  # 4 images over 20 ms: 3 (interpolated: 16 ms)
    assert batcher.limit == 3
    batcher.fit(timed)
    batcher._enqueue([image(v) for v in range(8)])  # queued before the loop collects
    batcher.start()
    await batcher.submit([image(8)])
    assert [len(batch) for batch in model.batches[:2]] == [4, 4]
    per_image_s[0] = 0.012
    for _ in range(20):
        await batcher.submit([image(v) for v in range(4)])
    await batcher.drain()
    assert batcher.limit == 1
    assert [len(batch) for batch in model.batches[-4:]] == [1, 1, 1, 1]


async def test_without_a_target_runs_do_not_move_the_limit() -> None:
    model = Recorder()
    batcher = make_batcher(model, max_batch_size=8, flat_batch_ms=1e9)
    timed = {1: 0.010, 2: 0.020, 4: 0.040, 8: 0.080}
    batcher.fit(timed)
    assert batcher.limit == 8
    batcher.start()
    await batcher.submit([image(v) for v in range(8)])
    await batcher.drain()
    assert batcher.limit == 8
    assert batcher.run_seconds == timed


async def test_failing_batch_fails_exactly_its_own_requests() -> None:
    def fail_on_13(batch: np.ndarray) -> Outputs:
        if 13 in batch[:, 0, 0, 0]:
            raise RuntimeError("boom")
        return echo(batch)

    batcher = make_batcher(Recorder(fail_on_13), max_batch_size=2)
    doomed = batcher._enqueue([image(12), image(13)])
    spared = batcher._enqueue([image(14)])
    for _ in range(2):
        batch = await batcher._collect()
        batcher._fan_out(batch, await batcher._run(batcher.lanes.first, batch, alone=False))
    for future in doomed:
        with pytest.raises(InferenceFailed, match="boom"):
            future.result()
    assert float(spared[0].result()["y"][0]) == 14


async def test_wrong_number_of_outputs_fails_the_batch() -> None:
    batcher = make_batcher(lambda batch: {"y": echo(batch)["y"][:1]})
    futures = batcher._enqueue([image(1), image(2)])
    batch = await batcher._collect()
    batcher._fan_out(batch, await batcher._run(batcher.lanes.first, batch, alone=False))
    for future in futures:
        with pytest.raises(InferenceFailed, match="1 outputs for a batch of 2"):
            future.result()


async def test_service_goes_on_after_a_failed_batch() -> None:
    calls = 0

    def fail_first(batch: np.ndarray) -> Outputs:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first call fails")
        return echo(batch)

    batcher = make_batcher(fail_first, max_wait_ms=0)
    batcher.start()
    with pytest.raises(InferenceFailed):
        await batcher.submit([image(1)])
    assert float((await batcher.submit([image(2)]))[0]["y"][0]) == 2
    await batcher.drain()


async def test_cancelled_items_are_dropped_before_inference() -> None:
    model = Recorder()
    batcher = make_batcher(model)
    gone, kept = batcher._enqueue([image(1)]), batcher._enqueue([image(2)])
    gone[0].cancel()
    batch = await batcher._collect()
    live = batcher._admit(batch)
    batcher._fan_out(live, await batcher._run(batcher.lanes.first, live, alone=False))
    assert model.batches == [[2]]
    assert float(kept[0].result()["y"][0]) == 2


async def test_cancelling_submit_drops_its_queued_images() -> None:
    model = Recorder()
    batcher = make_batcher(model)
    task = asyncio.ensure_future(batcher.submit([image(1), image(2)]))
    await asyncio.sleep(0)  # one loop turn: lets the task enqueue; no timing involved
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    batch = await batcher._collect()
    assert batcher._admit(batch) == []


@pytest.mark.parametrize("queued", [0, 3], ids=["empty-queue-too-small", "partly-full"])
async def test_full_queue_rejects_the_whole_request_with_retry_after(queued: int) -> None:
    batcher = make_batcher(echo, max_queue_images=4)
    batcher._enqueue([image(v) for v in range(queued)])
    with pytest.raises(Overloaded, match="max_queue_images=4") as raised:
        batcher._enqueue([image(9)] * (5 - queued))
    assert raised.value.headers == {"Retry-After": "1"}
    assert batcher.depth == queued


async def test_expired_items_get_504_without_using_the_model() -> None:
    model = Recorder()
    batcher = make_batcher(model, request_timeout_ms=1e-9, max_wait_ms=0)
    batcher.start()
    with pytest.raises(DeadlineExceeded, match="request_timeout_ms"):
        await batcher.submit([image(1)])
    await batcher.drain()
    assert model.batches == []


async def test_drain_finishes_queued_work_then_refuses_new_work() -> None:
    gate = threading.Event()

    def gated(batch: np.ndarray) -> Outputs:
        gate.wait()
        return echo(batch)

    batcher = make_batcher(gated, max_batch_size=1, max_wait_ms=0)
    batcher.start()
    pending = asyncio.ensure_future(batcher.submit([image(1), image(2)]))
    await asyncio.sleep(0)  # one loop turn: lets submit enqueue
    draining = asyncio.ensure_future(batcher.drain())
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        await batcher.submit([image(3)])
    gate.set()
    await draining
    assert [float(r["y"][0]) for r in await pending] == [1, 2]


async def test_a_dead_batching_task_fails_every_waiter_and_reports_it() -> None:
    failures: list[BaseException] = []
    # A model returning something without a length breaks the loop itself, not just one batch.
    batcher = make_batcher(lambda batch: None, max_batch_size=2)  # type: ignore[arg-type,return-value]
    batcher.on_failure = failures.append
    queued = batcher._enqueue([image(v) for v in range(5)])
    batcher.start()
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) for r in results), results
    assert [type(f) for f in failures] == [TypeError]
    with pytest.raises(InferenceFailed, match="batching task died"):
        await batcher.submit([image(9)])
    await batcher.drain()


async def test_batches_are_padded_to_their_bucket_and_padding_never_comes_back() -> None:
    model = Recorder()
    batcher = make_batcher(model, max_batch_size=8, buckets=(1, 4, 8))
    batcher.start()
    three = await batcher.submit([image(v) for v in (7, 8, 9)])
    six = await batcher.submit([image(v) for v in range(10, 16)])
    await batcher.drain()
    assert [float(r["y"][0]) for r in three] == [7, 8, 9]
    assert [float(r["y"][0]) for r in six] == list(range(10, 16))
    # Padding rows are zero images, after the real ones.
    assert model.batches == [[7, 8, 9, 0], [10, 11, 12, 13, 14, 15, 0, 0]]
    registry = batcher.registry  # type: ignore[attr-defined]
    labels = {"model": "m", "version": "1"}
    assert registry.get_sample_value("resnet_serve_batch_size_sum", labels) == 9
    assert registry.get_sample_value("resnet_serve_padded_batch_size_sum", labels) == 12


def test_bucket_for_picks_the_smallest_that_fits() -> None:
    assert [bucket_for(n, (1, 2, 4, 8)) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


async def test_concurrent_batches_compute_at_once_on_their_own_threads() -> None:
    # Each batch waits inside the model until the other arrives: only two lanes can pass.
    both_inside = threading.Barrier(2, timeout=30)
    threads: set[str] = set()

    def meet(batch: np.ndarray) -> Outputs:
        threads.add(threading.current_thread().name)
        both_inside.wait()
        return echo(batch)

    batcher = make_batcher(meet, max_batch_size=2, concurrent_batches=2)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit([image(1), image(2)]))
    await asyncio.sleep(0)  # loop turns only: the first batch leaves before the second comes
    second = asyncio.ensure_future(batcher.submit([image(3), image(4)]))
    results = await asyncio.gather(first, second)
    await batcher.drain()
    assert [[float(r["y"][0]) for r in result] for result in results] == [[1, 2], [3, 4]]
    assert len(threads) == 2


async def test_a_free_lane_starts_what_waits_while_another_lane_computes() -> None:
    release, started = threading.Event(), threading.Semaphore(0)
    model = Recorder()

    def held(batch: np.ndarray) -> Outputs:
        started.release()
        if 1 in batch[:, 0, 0, 0]:
            release.wait(timeout=30)
        return model(batch)

    batcher = make_batcher(held, max_batch_size=4, concurrent_batches=2)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit([image(1)]))
    await asyncio.to_thread(started.acquire)  # the first batch is computing
    await batcher.submit([image(2)])  # a lone image: the second lane, while the first holds
    assert model.batches == [[2]]
    release.set()
    await first
    await batcher.drain()
    assert model.batches == [[2], [1]]


async def test_work_runs_on_every_lane_at_once_or_one_after_another() -> None:
    batcher = make_batcher(echo, concurrent_batches=2)
    both_inside = threading.Barrier(2, timeout=30)  # passed only by two lanes at once

    def meet() -> str:
        both_inside.wait()
        return threading.current_thread().name

    threads = await batcher.lanes.run_on_each([meet, meet], at_once=True)
    assert len(set(threads)) == 2
    second_started = threading.Event()
    overlapped: list[bool] = []

    def first() -> None:  # in turn, the second cannot start while this waits for it
        overlapped.append(second_started.wait(timeout=0.2))

    await batcher.lanes.run_on_each([first, second_started.set], at_once=False)
    assert overlapped == [False]
    assert second_started.is_set()
    await batcher.drain()


async def test_a_dead_batch_among_concurrent_ones_fails_every_waiter() -> None:
    failures: list[BaseException] = []
    batcher = make_batcher(lambda batch: None, max_batch_size=1, concurrent_batches=3)  # type: ignore[arg-type,return-value]
    batcher.on_failure = failures.append
    queued = batcher._enqueue([image(v) for v in range(7)])
    batcher.start()
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) for r in results), results
    assert [type(f) for f in failures] == [TypeError]
    await batcher.drain()


async def test_a_batch_alone_runs_on_the_alone_function_and_any_other_does_not() -> None:
    shared, alone = Recorder(), Recorder()
    upstream = 1  # images admitted upstream and not finished, as admission counts them
    batcher = make_batcher(shared, alone_fn=alone, admitted_images=lambda: upstream)
    batcher.start()
    await batcher.submit([image(1)])  # nothing else anywhere: alone
    upstream = 3  # two more images are being read or decoded: not alone
    await batcher.submit([image(2)])
    await batcher.drain()
    assert alone.batches == [[1]]
    assert shared.batches == [[2]]


async def test_a_lone_batch_runs_on_the_event_loop_only_under_inline_max_ms() -> None:
    ran_on: list[str] = []

    def alone(batch: np.ndarray) -> Outputs:
        ran_on.append(threading.current_thread().name)
        return echo(batch)

    fast = make_batcher(echo, alone_fn=alone, admitted_images=lambda: 1, inline_max_ms=60_000.0)
    slow = make_batcher(echo, alone_fn=alone, admitted_images=lambda: 1, inline_max_ms=1e-9)
    loop = threading.current_thread().name
    for batcher in (fast, slow):
        batcher.start()
        for value in (1, 2, 3):
            assert float((await batcher.submit([image(value)]))[0]["y"][0]) == value
        await batcher.drain()
    # The first run of the size is timed on a lane; then the fast one's stay on the loop.
    assert ran_on[0] != loop
    assert ran_on[1:3] == [loop, loop]
    assert loop not in ran_on[3:]
