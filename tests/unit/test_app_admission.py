from __future__ import annotations

import asyncio

import pytest

from app.batching import admission as admission_module
from app.batching.admission import Admission, AdmissionConfig, CostEstimate, Lifecycle
from app.errors import Overloaded
from app.telemetry.metrics import Metrics

pytestmark = pytest.mark.anyio


def make(timeout_ms: float = 1000, wait_ms: float = 60_000, max_bytes: int = 100) -> Admission:
    lifecycle = Lifecycle(retry_after_s=4)
    lifecycle.mark_warmed()
    config = AdmissionConfig(timeout_ms, wait_ms, max_bytes)
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
