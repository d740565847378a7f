"""benchmarks.openloop against a fake server whose capacity is known: a token bucket that
answers 200 while it has a token and 503 otherwise, so the bisection must find its rate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from benchmarks.openloop import Probe, Schedule, Target, capacity, judge, measured_seconds, probe
from benchmarks.slo_report import markdown

RATE = 200.0  # the fake server's tokens per second
BURST = 25.0


class TokenBucket:
    def __init__(self, rate: float, burst: float, delay_s: float = 0.0) -> None:
        self.rate, self.burst, self.delay_s = rate, burst, delay_s
        self.tokens, self.stamp = burst, 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@asynccontextmanager
async def _serve(bucket: TokenBucket) -> AsyncIterator[asyncio.Server]:
    loop = asyncio.get_running_loop()
    bucket.stamp = loop.time()
    handlers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                if bucket.delay_s:
                    await asyncio.sleep(bucket.delay_s)
                ok = bucket.take(loop.time())
                body = b'{"ok": true}' if ok else b'{"error": "busy"}'
                status = b"200 OK" if ok else b"503 Service Unavailable\r\nRetry-After: 1"
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            handlers.discard(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server
        for writer in list(handlers):
            writer.close()
        await asyncio.sleep(0.05)  # the handlers see their connections closed


def _target(server: asyncio.Server) -> Target:
    port = server.sockets[0].getsockname()[1]
    return Target("127.0.0.1", port, "/predict", (b"x" * 1000, b"y" * 10), "text/plain")


def test_bisection_finds_a_token_bucket_rate() -> None:
    schedule = Schedule(warmup_s=0.3, seconds=2.0, bound_ms=1000.0, quantile=0.99)

    async def main() -> tuple[float, list[Probe]]:
        async with _serve(TokenBucket(RATE, BURST)) as server:
            return await capacity(
                lambda rate: probe(_target(server), rate, schedule), start=40.0, precision=0.05
            )

    found, probes = asyncio.run(main())
    # Poisson arrivals drain a bucket of 25 now and then even below its rate: the highest rate
    # with under 1% refused lies somewhat under 200.
    assert 0.7 * RATE <= found <= 1.05 * RATE, [(p.offered_per_s, p.good_share) for p in probes]
    assert any(p.offered_per_s > RATE and not p.passed for p in probes)
    refused = [p for p in probes if not p.passed]
    assert all(p.statuses.get("503", 0) for p in refused)  # with Retry-After: no "no Retry-After"
    assert all(p.client_cpu_percent > 0 and p.connections >= 1 for p in probes)


def test_latency_counts_from_the_scheduled_arrival() -> None:
    """A server slower than the bound fails every probe, however few requests are sent."""
    schedule = Schedule(warmup_s=0.0, seconds=1.0, bound_ms=20.0, timeout_s=2.0)

    async def main() -> Probe:
        async with _serve(TokenBucket(1e6, 1e6, delay_s=0.05)) as server:
            return await probe(_target(server), 20.0, schedule)

    result = asyncio.run(main())
    assert result.sent
    assert result.statuses == {"200": result.sent}
    assert result.p50_ms is not None
    assert result.p50_ms >= 50
    assert not result.passed
    assert result.good == 0


def test_bisection_walks_down_when_the_start_fails() -> None:
    async def fake(rate: float) -> Probe:
        measured = [(0.0, 0.01 if rate <= 33 else 0.2, "200")] * 100
        return judge(
            rate,
            measured,
            Schedule(bound_ms=50),
            client_cpu_percent=1.0,
            server_cpu_percent=None,
            connections=1,
            late_ms=0.0,
        )

    found, probes = asyncio.run(capacity(fake, start=100.0, precision=0.02))
    assert 33 * 0.98 <= found <= 33
    assert [p.passed for p in probes[:3]] == [False, False, True]  # 100, 50, 25


def test_report_names_the_ratios(tmp_path: Path) -> None:
    probe_row = {
        "offered_per_s": 100.0,
        "good_share": 1.0,
        "answered_per_s": 99.0,
        "p50_ms": 10.0,
        "p99_ms": 30.0,
        "statuses": {"200": 990},
        "server_cpu_percent": 90.0,
        "client_cpu_percent": 5.0,
        "connections": 4,
        "passed": True,
    }

    def run(server: str, capacity_per_s: float) -> dict[str, object]:
        return {
            "server": server,
            "model": "digits",
            "bound_ms": 50.0,
            "capacity_per_s": capacity_per_s,
            "capacity_vs_closed": 0.5,
            "c16": {"images_per_s": 2 * capacity_per_s},
            "c1": {"mean_ms": 9.0, "p99_ms": 12.0},
            "probes": [probe_row],
        }

    results = {
        "date": "today",
        "machine": {"cpu": "a CPU", "cpus": 2, "flags": "avx2", "platform": "linux"},
        "schedule": {"warmup_s": 3, "seconds": 15, "quantile": 0.99},
        "closed_loop_s": 8,
        "runs": [run("ours", 150.0), run("handwritten", 100.0), run("litserve", 75.0)],
    }
    text = markdown(json.loads(json.dumps(results)))
    assert "| ours | - | 150.0 | 1.50 | 2.00 | 0.50 |" in text
    assert "p99 bound 50 ms" in text


def test_a_probe_stretches_to_hold_enough_requests() -> None:
    schedule = Schedule(seconds=15.0, min_requests=300, max_seconds=120.0)
    assert measured_seconds(schedule, 100.0) == 15.0  # 300 arrive within 15 s anyway
    assert measured_seconds(schedule, 5.0) == 60.0
    assert measured_seconds(schedule, 1.0) == 120.0  # capped
    assert measured_seconds(Schedule(seconds=15.0), 1.0) == 15.0  # off by default
