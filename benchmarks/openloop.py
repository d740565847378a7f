"""Open-loop load: requests arrive when a Poisson process says, not when an answer comes back.

A closed loop of N clients slows down with the server it measures, so it never sees a queue grow;
real users keep arriving. Here each request is scheduled in advance (exponential gaps at the
offered rate) and its latency counts from its scheduled arrival, so a client that falls behind
cannot hide the server's queue (no coordinated omission). The client is a lean HTTP/1.1 one over
asyncio streams: each request's bytes are built once, a response is read by its Content-Length,
and connections are kept alive in a pool that grows only when every open one is busy; the client's
own CPU is measured and reported, since it shares the machine's cores with the server.

``capacity`` bisects the offered rate for the highest at which at least ``quantile`` of the
requests get a 200 within the latency bound (MLPerf's "server" scenario).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import psutil

OK = 200
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str
    bodies: tuple[bytes, ...]  # sent in turn
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()  # more of them (an API key)

    def requests(self) -> list[bytes]:
        """Each body as the whole request's bytes, built once."""
        more = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return [
            (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{more}"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
            for body in self.bodies
        ]


@dataclass(frozen=True)
class Schedule:
    warmup_s: float = 3.0  # at the offered rate, not measured
    seconds: float = 15.0  # the arrivals measured
    # At a low rate a window stretches (up to max_seconds) to hold this many arrivals: a p99 of
    # 45 requests is their slowest one, and moves with one hiccup.
    min_requests: int = 0
    max_seconds: float = 120.0
    bound_ms: float = 50.0  # the latency a good answer is within
    quantile: float = 0.99  # the share of requests that must be good
    timeout_s: float = 10.0  # a request unanswered this long counts as "timeout"
    max_connections: int = 1024  # beyond: "client_overflow" (the client's limit, not the server's)
    seed: int = 0


@dataclass
class Probe:
    """One offered rate: what happened to the requests that arrived in the measured seconds."""

    offered_per_s: float
    sent: int
    good: int  # 200 within the bound
    statuses: dict[str, int]
    p50_ms: float | None  # of the 200s
    p99_ms: float | None
    answered_per_s: float  # 200s per second of arrivals
    client_cpu_percent: float
    server_cpu_percent: float | None
    connections: int  # the most open at once
    late_sends_ms: float  # the client's worst lag behind the schedule
    passed: bool = field(default=False)

    @property
    def good_share(self) -> float:
        return self.good / self.sent if self.sent else 0.0


class Client:
    """A pool of keep-alive connections to one server."""

    def __init__(self, target: Target, schedule: Schedule) -> None:
        self.target = target
        self.schedule = schedule
        self._requests = target.requests()
        self._idle: list[Connection] = []
        self.open = 0
        self.most_open = 0

    async def send(self, index: int) -> str:
        """The status of one request (or why it has none), on an idle connection or a new one."""
        try:
            async with asyncio.timeout(self.schedule.timeout_s):
                reused = bool(self._idle)
                connection = await self._connection()
                if connection is None:
                    return "client_overflow"
                try:
                    status, keep, retry_after = await self._exchange(connection, index)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    # A kept-alive connection the server closed as it was reused: sent again
                    # on a new one, as HTTP clients do (nothing of an answer had arrived).
                    partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                    if not reused or partial:
                        raise
                    connection = await self._connection(new=True)
                    assert connection is not None
                    status, keep, retry_after = await self._exchange(connection, index)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        if keep:
            self._idle.append(connection)
        else:
            self._close(connection[1])
        # A refusal is only useful with the hint of when to come back: say when one lacks it.
        return str(status) if status < 500 or retry_after else f"{status} no Retry-After"

    async def _connection(self, new: bool = False) -> Connection | None:
        """An idle connection, else a new one; None past ``max_connections``."""
        if self._idle and not new:
            return self._idle.pop()
        if self.open >= self.schedule.max_connections:
            return None
        connection = await asyncio.open_connection(self.target.host, self.target.port)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        return connection

    async def _exchange(self, connection: Connection, index: int) -> tuple[int, bool, bool]:
        reader, writer = connection
        try:
            writer.write(self._requests[index % len(self._requests)])
            return await _response(reader)
        except BaseException:  # errors, timeouts and cancellation alike: the connection is spent
            self._close(writer)
            raise

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self.open -= 1
        writer.close()

    async def close(self) -> None:
        writers = [writer for _, writer in self._idle]
        self._idle.clear()
        self.open = 0
        for writer in writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool, bool]:
    """The status of one response, read whole (by its Content-Length), whether the connection
    stays open and whether it says when to retry."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, keep, retry_after = 0, True, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep = value.strip().lower() != b"close"
        elif name == b"retry-after":
            retry_after = True
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not read by this client")
    if length:
        await reader.readexactly(length)
    return status, keep, retry_after


async def probe(
    target: Target,
    rate: float,
    schedule: Schedule,
    server_cpu: Callable[[], float] | None = None,
) -> Probe:
    """Offer ``rate`` requests per second for warm-up plus the measured seconds, then wait
    for every request to end; ``server_cpu``: the server's CPU seconds so far (its share of
    the measured seconds is reported)."""
    client = Client(target, schedule)
    loop = asyncio.get_running_loop()
    rng = random.Random(f"{schedule.seed}-{rate}")
    measured: list[tuple[float, float, str]] = []  # (scheduled, finished, status)
    tasks: set[asyncio.Task[None]] = set()
    seconds = measured_seconds(schedule, rate)
    window = (schedule.warmup_s, schedule.warmup_s + seconds)
    me = psutil.Process()

    async def one(index: int, scheduled: float, counted: bool) -> None:
        status = await client.send(index)
        if counted:
            measured.append((scheduled, loop.time(), status))

    began = loop.time()
    at, index, late, cpu_marks = 0.0, 0, 0.0, {}
    while at < window[1]:
        delay = began + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        if window[0] <= at and "start" not in cpu_marks:
            cpu_marks["start"] = (_cpu(me), server_cpu() if server_cpu else 0.0, loop.time())
        task = loop.create_task(one(index, began + at, window[0] <= at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
        at += rng.expovariate(rate)
    cpu_marks["end"] = (_cpu(me), server_cpu() if server_cpu else 0.0, loop.time())
    if tasks:
        await asyncio.wait(tasks, timeout=schedule.timeout_s + 1)
    for task in tasks:  # only where the per-request timeout itself failed to fire
        task.cancel()
    await client.close()
    (client_0, server_0, t0), (client_1, server_1, t1) = cpu_marks["start"], cpu_marks["end"]
    return judge(
        rate,
        measured,
        replace(schedule, seconds=seconds),
        client_cpu_percent=100 * (client_1 - client_0) / (t1 - t0),
        server_cpu_percent=100 * (server_1 - server_0) / (t1 - t0) if server_cpu else None,
        connections=client.most_open,
        late_ms=1000 * late,
    )


def measured_seconds(schedule: Schedule, rate: float) -> float:
    """The probe's measured seconds at ``rate``: ``seconds``, or long enough for
    ``min_requests`` arrivals, within ``max_seconds``."""
    wanted = schedule.min_requests / rate if rate > 0 else 0.0
    return max(schedule.seconds, min(wanted, schedule.max_seconds))


def judge(
    rate: float,
    measured: Sequence[tuple[float, float, str]],
    schedule: Schedule,
    **costs: Any,
) -> Probe:
    """A probe's figures from its requests' (scheduled, finished, status)."""
    statuses = Counter(status for _, _, status in measured)
    ms = sorted(1000 * (end - start) for start, end, status in measured if status == str(OK))
    good = sum(value <= schedule.bound_ms for value in ms)
    result = Probe(
        offered_per_s=rate,
        sent=len(measured),
        good=good,
        statuses=dict(statuses.most_common()),
        p50_ms=float(np.percentile(ms, 50)) if ms else None,
        p99_ms=float(np.percentile(ms, 99)) if ms else None,
        answered_per_s=len(ms) / schedule.seconds,
        client_cpu_percent=costs["client_cpu_percent"],
        server_cpu_percent=costs["server_cpu_percent"],
        connections=costs["connections"],
        late_sends_ms=costs["late_ms"],
    )
    result.passed = bool(measured) and result.good_share >= schedule.quantile
    return result


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def capacity(
    probe_at: Callable[[float], Awaitable[Probe]],
    start: float,
    precision: float = 0.05,
    max_probes: int = 9,
) -> tuple[float, list[Probe]]:
    """The highest offered rate found to pass, within ``precision`` (relative) where the
    probes allow, and every probe made: doubling from ``start`` until one fails, halving until
    one passes, then bisecting between the two (geometric means, since the error is relative)."""
    probes: list[Probe] = []

    async def passes(rate: float) -> bool:
        result = await probe_at(rate)
        probes.append(result)
        return result.passed

    low, high = 0.0, math.inf
    rate = start
    while len(probes) < max_probes and (high == math.inf or low == 0.0):
        if await passes(rate):
            low = rate
            if high != math.inf:
                break
            rate *= 2
        else:
            high = rate
            if low:
                break
            rate /= 2
    while len(probes) < max_probes and low and high / low > 1 + precision:
        middle = math.sqrt(low * high)
        if await passes(middle):
            low = middle
        else:
            high = middle
    return low, probes


def as_dict(result: Probe) -> dict[str, Any]:
    return {**asdict(result), "good_share": result.good_share}
