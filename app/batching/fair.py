"""Fair shares between callers: every queue a request waits in serves callers in turn, higher
priorities first.

The request's caller (app.edge.requests: an API key, or the client's address when keys are
off) travels in a context variable, set where the key is checked (HTTP: app.http.auth, gRPC:
app.grpc.service), and every queue behind the door reads it:
the door itself (app.batching.admission), the decode threads (``FairExecutor``) and the batch
queue (``FairQueue``). Within a caller, first come first served; between callers, weighted round
robin on images (deficit round robin with a unit cost: every queued thing is one image or one
waiting request). A caller sending 30x more than another then gets its own backlog, not the
other's share: the light caller's image joins the next decode and the next batch.

Priorities (a key's ``priority=``) come before shares: every queue serves a high caller's work
before a normal one's, and a normal one's before a low one's, and shares are kept within a
priority. So low-priority work can wait for as long as higher work keeps coming (by design: it
is what low means); the health probes never queue here, so no priority can starve them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any, Generic, TypeVar

from app.edge.requests import Caller, Priority, caller

T = TypeVar("T")


class RoundRobin(Generic[T]):
    """Items in first-in-first-out order per caller, the highest priority's first, taken from
    the callers of a priority in weighted turns (``Turns``).

    Not thread-safe: its owner serialises access (the event loop, or a lock).
    """

    def __init__(self) -> None:
        self._classes = tuple(Turns[T]() for _ in Priority)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def push(self, who: Caller, item: T) -> None:
        self._classes[who.priority].push(who, item)
        self._size += 1

    def next_priority(self) -> Priority:
        """The priority of the item ``pop`` would return (there is one)."""
        return next(Priority(index) for index, turns in enumerate(self._classes) if turns)

    def pop(self) -> T:
        for turns in self._classes:
            if turns:
                self._size -= 1
                return turns.pop()
        raise IndexError("pop from an empty RoundRobin")


class Turns(Generic[T]):
    """Items in first-in-first-out order per caller, taken from callers in weighted turns."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}
        self._turns: deque[Caller] = deque()  # callers with items, the one whose turn it is first
        self._taken = 0  # items the first caller has taken in its current turn
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def push(self, who: Caller, item: T) -> None:
        queue = self._queues.get(who.identity)
        if queue is None:
            queue = self._queues[who.identity] = deque()
            self._turns.append(who)
        queue.append(item)
        self._size += 1

    def pop(self) -> T:
        """The next item: the current caller's oldest, its turn passing on after ``weight``."""
        who = self._turns[0]
        queue = self._queues[who.identity]
        item = queue.popleft()
        self._size -= 1
        self._taken += 1
        if not queue:
            del self._queues[who.identity]
            self._turns.popleft()
            self._taken = 0
        elif self._taken >= who.weight:
            self._turns.rotate(-1)
            self._taken = 0
        return item


class FairQueue(Generic[T]):
    """asyncio.Queue's bounded put/get/join, served by caller in turn (``RoundRobin``).

    ``put_nowait`` files an item under the current context's caller.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: RoundRobin[T] = RoundRobin()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._unfinished = 0
        self._finished = asyncio.Event()
        self._finished.set()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if len(self._items) >= self.maxsize:
            raise asyncio.QueueFull
        self._items.push(caller.get(), item)
        self._unfinished += 1
        self._finished.clear()
        self._wake_next()

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop()

    def next_priority(self) -> Priority:
        """The priority of the item ``get`` would return (the queue is not empty)."""
        return self._items.next_priority()

    async def get(self) -> T:
        await self.ready()
        return self._items.pop()

    async def ready(self) -> None:
        """Until an item is queued, taking none."""
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                # Woken and cancelled at once: pass the wake-up on, or an item would sit.
                if self._items and not getter.cancelled():
                    self._wake_next()
                raise

    def _wake_next(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def task_done(self) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            self._finished.set()

    async def join(self) -> None:
        await self._finished.wait()


class FairExecutor(Executor):
    """A thread pool whose waiting work is served by caller in turn (``RoundRobin``).

    ``submit`` (as ``loop.run_in_executor`` calls it, in the request's context) files the work
    under the current caller.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._work: RoundRobin[tuple[Future[Any], Callable[[], Any]]] = RoundRobin()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}_{index}", daemon=True)
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._ready:
            if self._stopping:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._work.push(caller.get(), (future, lambda: fn(*args, **kwargs)))
            self._ready.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._stopping = True
            if cancel_futures:
                while self._work:
                    self._work.pop()[0].cancel()
            self._ready.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._work and not self._stopping:
                    self._ready.wait()
                if not self._work:  # stopping, and everything queued is done
                    return
                future, work = self._work.pop()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = work()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)


# A caller whose last request finished this recently still counts as competing: a closed-loop
# client is between two requests for a moment, and its share must not go to another meanwhile.
ACTIVE_S = 1.0
# How often callers idle for longer than that are forgotten.
RECOUNT_S = 0.05


class Shares:
    """Each caller's images admitted and not finished, and whether one more is within its share.

    Shares are kept among the callers of one priority: a caller's share is of what its own
    priority holds, and callers of other priorities neither count nor compete in it (the door
    lets higher priorities in first: app.batching.admission).

    While one caller of a priority competes it may have all of the room (admission by predicted
    wait decides alone). While several do, a caller is let in only while it holds no more than
    its weighted share of everything its priority holds; the rest of its requests wait at the
    door, costing nothing, and room that opens goes to the callers under their share first. A
    caller holding nothing is always let in (so many callers of one image each are never kept
    out by their count).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.held: dict[str, int] = {}  # images per caller holding any
        classes = len(Priority)
        self._class_held = [0] * classes  # images held, per priority
        self._holding_weight = [0] * classes  # of the callers in ``held``, per priority
        # Callers that hold nothing now: since when, and who (they still compete a while).
        self._idle: dict[str, tuple[float, Caller]] = {}
        self._idle_weight = [0] * classes  # of the callers in ``_idle``, per priority
        self._pruned = float("-inf")

    def take(self, who: Caller, images: int) -> None:
        mine = self.held.get(who.identity, 0)
        if not mine:
            self._holding_weight[who.priority] += who.weight
            idle = self._idle.pop(who.identity, None)
            if idle is not None:
                self._idle_weight[idle[1].priority] -= idle[1].weight
        self.held[who.identity] = mine + images
        self._class_held[who.priority] += images

    def give_back(self, who: Caller, images: int) -> None:
        self._class_held[who.priority] -= images
        left = self.held[who.identity] - images
        if left:
            self.held[who.identity] = left
            return
        del self.held[who.identity]
        self._holding_weight[who.priority] -= who.weight
        self._idle[who.identity] = (self._clock(), who)
        self._idle_weight[who.priority] += who.weight

    def allows(self, who: Caller, waiting: Callable[[], Iterable[Caller]]) -> bool:
        """Whether ``who`` may have one more image in; ``waiting()``: the callers waiting at the
        door."""
        mine = self.held.get(who.identity, 0)
        if not mine:
            return True
        self._prune()
        held, idle, priority = self.held, self._idle, who.priority
        newcomers = sum(
            w.weight
            for w in waiting()
            if w.priority == priority and w.identity not in held and w.identity not in idle
        )
        competing = self._holding_weight[priority] + self._idle_weight[priority] + newcomers
        if competing <= who.weight:
            return True
        return (mine + 1) * competing <= (self._class_held[priority] + 1) * who.weight

    def _prune(self) -> None:
        """Forget the callers idle for longer than ACTIVE_S (looked at most every RECOUNT_S)."""
        now = self._clock()
        if now - self._pruned < RECOUNT_S:
            return
        self._pruned = now
        for identity, (since, who) in list(self._idle.items()):
            if now - since > ACTIVE_S:
                del self._idle[identity]
                self._idle_weight[who.priority] -= who.weight
