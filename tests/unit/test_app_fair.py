"""Fair shares between callers: the queues (tests/integration/test_app_fair_server.py: two API keys
on a real server)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from app.batching.fair import FairExecutor, FairQueue, RoundRobin, Shares
from app.edge.requests import Caller, Priority, caller

HEAVY, LIGHT = Caller("key:h", "heavy"), Caller("key:l", "light")


def test_round_robin_takes_callers_in_weighted_turns_each_in_arrival_order() -> None:
    turns: RoundRobin[str] = RoundRobin()
    for index in range(5):
        turns.push(HEAVY, f"h{index}")
    turns.push(LIGHT, "l0")
    turns.push(LIGHT, "l1")
    assert [turns.pop() for _ in range(7)] == ["h0", "l0", "h1", "l1", "h2", "h3", "h4"]
    weighted = Caller("key:w", "weighted", weight=3)
    for index in range(4):
        turns.push(weighted, f"w{index}")
        turns.push(LIGHT, f"l{index}")
    assert [turns.pop() for _ in range(8)] == ["w0", "w1", "w2", "l0", "w3", "l1", "l2", "l3"]
    assert not turns


def test_the_batch_queue_serves_a_light_caller_behind_a_heavy_backlog_next() -> None:
    async def scenario() -> list[str]:
        queue: FairQueue[str] = FairQueue(maxsize=100)
        for index in range(20):
            contextvars.copy_context().run(_put, queue, HEAVY, f"h{index}")
        contextvars.copy_context().run(_put, queue, LIGHT, "l0")
        first_two = [await queue.get(), await queue.get()]
        rest = [queue.get_nowait() for _ in range(queue.qsize())]
        # A getter cancelled after an item woke it leaves the item for the next one.
        getter = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        contextvars.copy_context().run(_put, queue, LIGHT, "l1")
        getter.cancel()
        rest.append(await asyncio.wait_for(queue.get(), 1))
        for _ in first_two + rest:
            queue.task_done()
        await asyncio.wait_for(queue.join(), 1)
        return first_two + rest

    order = asyncio.run(scenario())
    assert order[:2] == ["h0", "l0"]
    assert sorted(order) == sorted([f"h{i}" for i in range(20)] + ["l0", "l1"])


def _put(queue: FairQueue[str], who: Caller, item: str) -> None:
    caller.set(who)
    queue.put_nowait(item)


def test_the_decode_threads_run_a_light_callers_work_before_a_heavy_backlog() -> None:
    executor = FairExecutor(1, "test_decode")
    release, ran = threading.Event(), list[str]()
    try:
        contextvars.copy_context().run(_submit, executor, HEAVY, release.wait)
        futures = [
            contextvars.copy_context().run(_submit, executor, HEAVY, ran.append, f"h{i}")
            for i in range(5)
        ]
        futures.append(contextvars.copy_context().run(_submit, executor, LIGHT, ran.append, "l"))
        release.set()
        for future in futures:
            future.result(timeout=5)
    finally:
        executor.shutdown()
    # Whether the blocker was taken before or after the rest arrived, light is next or second.
    assert ran.index("l") < ran.index("h1"), ran


def _submit(
    executor: FairExecutor, who: Caller, fn: Callable[..., object], *args: object
) -> Future[object]:
    caller.set(who)
    return executor.submit(fn, *args)


def test_shares_hold_a_caller_to_its_weighted_share_only_while_others_compete() -> None:
    now = [0.0]
    shares = Shares(lambda: now[0])
    for _ in range(10):
        assert shares.allows(HEAVY, waiting=tuple)
        shares.take(HEAVY, 1)
    # Alone it may have everything; a newcomer at the door competes at once, and is let in.
    assert not shares.allows(HEAVY, waiting=lambda: [LIGHT])
    assert shares.allows(LIGHT, waiting=lambda: [LIGHT])
    shares.take(LIGHT, 1)
    now[0] += 0.1
    assert not shares.allows(HEAVY, waiting=tuple)
    assert shares.allows(LIGHT, waiting=tuple)
    for _ in range(9):
        shares.give_back(HEAVY, 1)
    assert not shares.allows(HEAVY, waiting=tuple)  # 1 of 2: its half
    shares.take(LIGHT, 1)
    assert shares.allows(HEAVY, waiting=tuple)  # 2 of 4 would be its half
    # The light caller's last request finished long ago: it no longer competes.
    shares.give_back(LIGHT, 2)
    now[0] += 5
    shares.take(HEAVY, 5)
    assert shares.allows(HEAVY, waiting=tuple)


def test_round_robin_serves_higher_priorities_first_and_turns_within_one() -> None:
    high = Caller("key:hi", "high", priority=Priority.HIGH)
    high2 = Caller("key:hi2", "high2", priority=Priority.HIGH)
    low = Caller("key:lo", "low", priority=Priority.LOW)
    turns: RoundRobin[str] = RoundRobin()
    for index in range(2):
        turns.push(low, f"lo{index}")
        turns.push(HEAVY, f"n{index}")
        turns.push(high, f"h{index}")
    turns.push(high2, "g0")
    assert [turns.pop() for _ in range(len(turns))] == ["h0", "g0", "h1", "n0", "n1", "lo0", "lo1"]
    with pytest.raises(IndexError):
        turns.pop()


def test_shares_are_kept_within_a_priority() -> None:
    shares = Shares(lambda: 0.0)
    high = Caller("key:hi", "high", priority=Priority.HIGH)
    for _ in range(10):
        shares.take(HEAVY, 1)
    # A high caller competes with no normal one: it may have everything its class holds...
    shares.take(high, 3)
    assert shares.allows(high, waiting=lambda: [LIGHT])
    # ...and the heavy normal caller's share is of what normal callers hold, not of the total.
    assert shares.allows(HEAVY, waiting=tuple)
    assert not shares.allows(HEAVY, waiting=lambda: [LIGHT])
