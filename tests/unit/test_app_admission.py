from __future__ import annotations

import asyncio

import pytest

from app.batching import admission as admission_module
from app.batching.admission import (
    Admission,
    AdmissionConfig,
    CostEstimate,
    DepthLimit,
    Lifecycle,
    Ticket,
)
from app.edge.requests import Caller, Priority, caller
from app.errors import Overloaded
from app.telemetry.metrics import Metrics

pytestmark = pytest.mark.anyio


def make(
    timeout_ms: float = 1000,
    wait_ms: float = 60_000,
    max_bytes: int = 100,
    target_ms: float | None = None,
) -> Admission:
    lifecycle = Lifecycle(retry_after_s=4)
    lifecycle.mark_warmed()
    config = AdmissionConfig(timeout_ms, wait_ms, max_bytes, latency_target_ms=target_ms)
    admission = Admission(config, lifecycle, Metrics())
    admission.estimates.add(CostEstimate())  # one model version being served
    return admission


def cost(admission: Admission) -> CostEstimate:
    (estimate,) = admission.estimates
    return estimate


def rejected(admission: Admission, reason: str) -> float:
    value = admission.metrics.registry.get_sample_value(
        "resnet_serve_rejected_total", {"reason": reason}
    )
    return value or 0.0


async def test_admits_at_once_while_the_predicted_wait_fits_the_deadline() -> None:
    admission = make(timeout_ms=1000)
    (await admission.enter()).release()  # nothing measured yet: nothing to predict
    cost(admission).observe_batch(images=4, seconds=1.0)  # 250 ms per image
    with await admission.enter(), admission.work(3):
        assert admission.provisional == 0
        assert admission.predicted_wait_s() == pytest.approx(1.0)
        with pytest.raises(Overloaded, match="request_timeout_ms=1000") as refused:
            admission.work(2).__enter__()
        assert refused.value.headers == {"Retry-After": "4"}
    assert (admission.pending_images, admission.provisional) == (0, 0)
    assert rejected(admission, "predicted_wait") == 1


async def test_a_late_request_waits_at_the_door_and_enters_when_room_opens() -> None:
    admission = make(timeout_ms=1000)
    cost(admission).observe_batch(images=4, seconds=1.0)  # 250 ms: 3 images fit in 80% of 1 s
    with admission.work(3):
        first = asyncio.ensure_future(admission.enter())
        second = asyncio.ensure_future(admission.enter())
        await asyncio.sleep(0)
        assert not first.done()
        registry = admission.metrics.registry
        assert registry.get_sample_value("resnet_serve_admission_waiting") == 2
    # 3 images done: room for 3 again, given out first come, first served.
    ticket = await first
    assert admission.provisional == 2
    assert second.done()
    ticket.release()
    (await second).release()
    assert admission.provisional == 0


async def test_a_request_waits_only_for_work_of_its_priority_and_higher() -> None:
    admission = make(timeout_ms=1000)
    cost(admission).observe_batch(images=4, seconds=1.0)  # 3 images fit

    def enter_as(who: Caller) -> asyncio.Future[Ticket]:
        token = caller.set(who)
        try:
            return asyncio.ensure_future(admission.enter())
        finally:
            caller.reset(token)

    with admission.work(2):  # normal work (the context's caller)
        with admission.work(1):
            low = enter_as(Caller("key:lo", "low", priority=Priority.LOW))
            normal = enter_as(Caller("key:n", "normal"))
            high = enter_as(Caller("key:hi", "high", priority=Priority.HIGH))
            await asyncio.sleep(0)
            # Nothing of its priority is ahead of the high one: it goes in at once.
            assert [low.done(), normal.done(), high.done()] == [False, False, True]
            (await high).release()
        # Room for one: the normal request, which came after the low one.
        await asyncio.sleep(0)
        assert [normal.done(), low.done()] == [True, False]
        (await normal).release()
        await asyncio.sleep(0)
        (await low).release()
    assert (admission.pending_seconds, admission.provisional) == (0, 0)


async def test_a_door_that_never_opens_answers_503_after_admission_wait_ms() -> None:
    admission = make(timeout_ms=1000, wait_ms=1)
    cost(admission).observe_batch(images=1, seconds=2.0)  # even one image is late
    with pytest.raises(Overloaded, match="admission_wait_ms=1"):
        await admission.enter()
    assert rejected(admission, "predicted_wait") == 1


async def test_a_ticket_stops_counting_when_its_upload_is_slow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission_module, "PROVISIONAL_S", 0.0)
    admission = make()
    ticket = await admission.enter()
    for _ in range(100):  # loop turns until the expiry timer has run
        if admission.provisional == 0:
            break
        await asyncio.sleep(0)
    assert admission.provisional == 0
    ticket.release()
    assert admission.provisional == 0


async def test_cost_estimate_follows_the_measured_batches() -> None:
    admission = make()
    cost(admission).observe_batch(images=1, seconds=1.0)
    for _ in range(60):
        cost(admission).observe_batch(images=8, seconds=0.08)
    assert cost(admission).seconds_per_image == pytest.approx(0.01, rel=0.01)


async def test_each_version_counts_at_its_own_cost_and_the_door_at_the_dearest() -> None:
    admission = make(timeout_ms=1000)
    cheap, dear = cost(admission), CostEstimate()
    admission.estimates.add(dear)
    cheap.observe_batch(images=10, seconds=0.1)  # 10 ms an image
    dear.observe_batch(images=1, seconds=0.2)  # 200 ms an image
    with admission.work(20, estimate=cheap):
        assert admission.predicted_wait_s(1, cheap) == pytest.approx(0.21)
        assert admission.predicted_wait_s(1, dear) == pytest.approx(0.4)
        ticket = await admission.enter()  # a body still coming counts as the dearest image
        assert admission.predicted_wait_s(0) == pytest.approx(0.4)
        with pytest.raises(Overloaded):
            admission.work(3, estimate=dear).__enter__()  # 0.2 + 0.2 + 0.6 > 80% of 1 s
        ticket.release()
    assert admission.pending_seconds == pytest.approx(0.0)


async def test_buffered_bytes_shed_the_excess_but_never_the_first_request() -> None:
    admission = make(max_bytes=100)
    with admission.buffering() as big:
        big.add(150)  # alone over the limit: proceeds (max_request_bytes bounds it)
        with admission.buffering() as second:
            with pytest.raises(Overloaded, match="max_buffered_bytes=100"):
                second.add(1)
            with pytest.raises(Overloaded, match="max_buffered_bytes=100"):
                await admission.enter()
    assert admission.buffered_bytes == 0
    (await admission.enter()).release()
    assert rejected(admission, "upload_buffers") == 2


def test_the_depth_limit_settles_where_one_in_a_hundred_misses_the_target() -> None:
    """Work that takes 10 ms per image in flight, every 20th twice that: against a 50 ms target
    depth 5 always keeps to it, depth 3 and 4 miss only with the slow ones (5%, too many),
    depth 2 never; the limit settles between 2 and 3."""
    limit = DepthLimit(0.050)
    assert limit.images == DepthLimit.START
    for index in range(20_000):
        depth = max(1, round(limit.images))  # a full queue: work comes in at the limit
        slow = 2.0 if index % 20 == 0 else 1.0
        limit.observe(depth, 0.010 * depth * slow + 0.001)
    assert 1.5 <= limit.images < 3.5  # steps up slowly from 2, drops by one from 3
    assert limit.allows(1)
    assert not limit.allows(4)  # where 5% miss


def test_the_depth_limit_ignores_work_far_inside_it() -> None:
    limit = DepthLimit(0.050)
    for _ in range(1000):
        limit.observe(1, 0.001)  # a light load: nothing near the limit of 8
    assert limit.images == DepthLimit.START
    limit.observe(8, 0.200)
    assert limit.images == DepthLimit.START - 1


async def test_a_latency_target_refuses_at_once_what_would_miss_it() -> None:
    """With the depth limit learned at 5 images, the one coming in plus 4 ahead are admitted;
    the next is refused at once, not after waiting at the door."""
    admission = make(timeout_ms=10_000, target_ms=100.0)
    assert admission.depth_limit is not None
    admission.depth_limit.images = 5.0
    tickets = [await admission.enter() for _ in range(5)]
    with pytest.raises(Overloaded, match="latency_target_ms=100") as refused:
        await admission.enter()
    registry = admission.metrics.registry  # refused without a wait at the door
    assert registry.get_sample_value("resnet_serve_admission_wait_seconds_count") == 6
    assert registry.get_sample_value("resnet_serve_admission_wait_seconds_sum") == 0
    assert refused.value.headers == {"Retry-After": "4"}
    assert rejected(admission, "latency_target") == 1
    with pytest.raises(Overloaded, match="latency_target_ms=100"):
        admission.work(2).__enter__()  # a request without a ticket (gRPC), two images
    tickets.pop().release()
    (await admission.enter()).release()  # room again
    for ticket in tickets:
        ticket.release()


async def test_a_target_below_one_request_still_admits_a_lone_one() -> None:
    admission = make(target_ms=1.0)
    assert admission.depth_limit is not None
    admission.depth_limit.images = 1.0  # even one misses the target
    with (
        await admission.enter(),
        admission.work(1),
        pytest.raises(Overloaded, match="latency_target"),
    ):
        await admission.enter()


async def test_the_depth_limit_is_learned_from_the_work_admitted() -> None:
    admission = make(target_ms=30.0)
    limit = admission.depth_limit
    assert limit is not None
    limit.images = 2.0
    with admission.work(1):  # no ticket (gRPC): learned as the work ends, at depth 1
        await asyncio.sleep(0.05)
    assert limit.images == 1.0  # missed the target
    limit.images = 2.0
    with await admission.enter():  # through the door: learned as the request ends
        with admission.work(1):
            pass
        assert limit.images == 2.0
        await asyncio.sleep(0.05)  # the answer takes its time to go out
    assert limit.images == 1.0
    limit.images = 2.0
    with pytest.raises(RuntimeError), admission.work(1):
        raise RuntimeError("a failed decode")
    assert limit.images == 2.0  # a failure is not learned from
