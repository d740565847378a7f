"""Per-key rate limits (app.edge.limits): the algorithm, its tables and the headers it answers
with (tests/integration/test_limits_server.py: on real servers, workers and Redis)."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from app.edge.limits import SLOTS, Limiter, LocalTable, RateLimited, SharedTable, Table, gcra
from app.edge.requests import Caller, Rate
from app.telemetry.metrics import Metrics

FIVE = Rate(per_second=5.0, burst=2)  # one every 0.2 s, two at once


def takes(table: Table, times: list[float], rate: Rate = FIVE, who: str = "key:a") -> list[bool]:
    return [table.take(who, rate, now).allowed for now in times]


def test_a_burst_goes_at_once_and_then_one_per_interval() -> None:
    table = LocalTable()
    assert takes(table, [0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.4]) == [
        True,
        True,
        False,
        False,
        True,
        False,
        True,
    ]


def test_a_refusal_costs_nothing_and_says_when_to_come_back() -> None:
    full_at, first = gcra(0.0, 0.0, FIVE)
    full_at, second = gcra(full_at, 0.0, FIVE)
    assert (first.remaining, second.remaining) == (1, 0)
    unchanged, refused = gcra(full_at, 0.05, FIVE)
    assert unchanged == full_at
    assert not refused.allowed
    assert refused.retry_s == pytest.approx(0.15)  # the next one fits at 0.2 s
    assert refused.reset_s == pytest.approx(0.35)  # and the bucket is full at 0.4 s


def test_each_key_has_its_own_bucket() -> None:
    table = LocalTable()
    assert takes(table, [0.0, 0.0, 0.0], who="key:a") == [True, True, False]
    assert takes(table, [0.0, 0.0], who="key:b") == [True, True]


def test_headers_follow_the_ietf_draft() -> None:
    _, allowed = gcra(0.0, 0.0, Rate(10.0, 20))
    assert allowed.headers() == {
        "RateLimit-Policy": '"key";q=20;w=2',
        "RateLimit": '"key";r=19;t=1',
    }
    _, slow = gcra(0.0, 0.0, Rate(0.5, 1))  # one request per 2 s
    _, refused = gcra(2.0, 0.5, Rate(0.5, 1))
    assert slow.headers()["RateLimit-Policy"] == '"key";q=1;w=2'
    assert refused.headers() == {
        "RateLimit-Policy": '"key";q=1;w=2',
        "RateLimit": '"key";r=0;t=2',
        "Retry-After": "2",
    }
    _, fast = gcra(0.0, 0.0, Rate(250.0, 10))
    assert fast.headers()["RateLimit-Policy"] == '"key";q=250;w=1'


def test_the_shared_table_agrees_with_the_local_one() -> None:
    shared = SharedTable(multiprocessing.get_context("spawn"))
    times = [0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.4, 1.0, 1.0, 1.0]
    assert takes(shared, times) == takes(LocalTable(), times)
    assert takes(shared, [5.0, 5.0, 5.0], who="key:b") == [True, True, False]


def test_the_shared_table_reuses_full_buckets_and_overflows_to_its_own() -> None:
    shared = SharedTable(multiprocessing.get_context("spawn"))
    many = [f"key:{index}" for index in range(SLOTS * 2)]
    # Twice as many keys as slots, each busy: the ones without a slot are limited locally.
    for who in many:
        assert takes(shared, [0.0, 0.0, 0.0], who=who) == [True, True, False]
    # A second later every bucket is full again: its slot may serve another key.
    assert takes(shared, [1.0, 1.0, 1.0], who="key:new") == [True, True, False]


def _hammer(table: SharedTable, now: float, results: multiprocessing.Queue[int]) -> None:
    results.put(sum(table.take("key:a", Rate(1.0, 50), now).allowed for _ in range(40)))


def test_the_shared_table_holds_across_processes() -> None:
    context = multiprocessing.get_context("spawn")
    table = SharedTable(context)
    results: multiprocessing.Queue[int] = context.Queue()
    workers = [context.Process(target=_hammer, args=(table, 100.0, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    allowed = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sum(allowed) == 50  # 120 asked, the burst of 50 let through, whoever asked


def test_a_refusal_told_later_names_the_shorter_waits() -> None:
    _, refused = gcra(0.4, 0.05, FIVE)  # the bucket is empty: one more fits at 0.2 s
    later = refused.later(1.0)
    assert (later.retry_s, later.reset_s) == (0.0, 0.0)
    assert later.headers()["Retry-After"] == "0"
    assert refused.later(0.1).retry_s == pytest.approx(0.05)


@pytest.mark.anyio
async def test_refusals_are_answered_when_their_turn_would_come_one_interval_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # the holds asked for, not the clock's
        held.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("app.edge.limits.asyncio.sleep", sleep)
    limiter = Limiter(Metrics(), delay_ms=1000)
    who = Caller("key:a", "a", rate=Rate(20.0, 1))  # one every 50 ms
    assert await limiter.check(who) is not None

    async def refused() -> str:
        with pytest.raises(RateLimited) as caught:
            await limiter.check(who)
        return caught.value.headers["Retry-After"]

    # Come back now: it is your turn, each one interval after the one before.
    assert await asyncio.gather(*(refused() for _ in range(3))) == ["0", "0", "0"]
    assert sorted(held) == pytest.approx([0.05, 0.10, 0.15], abs=0.005)


def test_a_lock_left_held_by_a_killed_worker_leaves_each_worker_its_own_limit() -> None:
    shared = SharedTable(multiprocessing.get_context("spawn"))
    shared._lock.acquire()  # as a worker SIGKILLed inside it would leave it
    assert takes(shared, [0.0, 0.0, 0.0]) == [True, True, False]
