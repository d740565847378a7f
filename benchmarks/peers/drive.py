"""The load: the same aiohttp client for every server, one 500x375 JPEG per request, sent as a
multipart field named ``image`` to ``/predict`` (the field every peer reads; ours reads any)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil

from benchmarks.peers.report import OK, Outcome, cpu_seconds, summarize
from benchmarks.peers.servers import Server, log_tail


@dataclass(frozen=True)
class Load:
    warmup_s: float = 3.0
    # A server still not answering every client after this long is measured anyway, with
    # "steady": false in its point, so one collapsing server cannot stretch the run.
    max_warmup_s: float = 20.0
    seconds: float = 12.0
    # A window stretches (up to 4x ``seconds``) until it can hold this many 200s at the rate the
    # warm-up saw: a p99 from 270 answers is the third slowest, and moves with one hiccup.
    min_answers: int = 0
    # After a refused or failed request a client waits as long as the answer's Retry-After
    # says (as urllib3's Retry does), else backoff_s, so a fast 503 is not a busy loop.
    backoff_s: float = 0.1
    max_retry_after_s: float = 5.0
    timeout_s: float = 60.0
    start_timeout_s: float = 300.0


BOUNDARY = "resnet-serve-benchmark-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def form(image: bytes, filename: str, kind: str) -> bytes:
    """The multipart body aiohttp's FormData would send, encoded once: encoding it per request
    took a measured share of the client's CPU, which shares the cores with the servers."""
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: {kind}\r\n\r\n"
    )
    return head.encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def top5(body: Any) -> list[int]:
    """class_ids of the five best predictions, from ours ({"results": [...]}) or a peer's."""
    if isinstance(body, list):  # BentoML returns the request's slice of the batch
        body = body[0]
    if "results" in body:
        body = body["results"][0]
    return [int(p["class_id"]) for p in body["predictions"][:5]]


async def wait_ready(server: Server, image: bytes, load: Load) -> float:
    """Seconds from process start to the first 200 from /predict with a real image."""
    deadline = server.started + load.start_timeout_s
    body = form(image, "a.jpg", "image/jpeg")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while time.perf_counter() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited:\n{log_tail(server)}")
            try:
                async with session.post(server.url, data=body, headers=MULTIPART) as r:
                    if r.status == 200:
                        return time.perf_counter() - server.started
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} not answering after {load.start_timeout_s} s")


async def served_by(predict_url: str) -> str:
    """Ours, at ``predict_url``: the runtime and precision its ``backend=auto`` chose at this
    start, as /v1/models says."""
    base = predict_url.rsplit("/", 1)[0]
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"{base}/v1/models") as response,
    ):
        model = (await response.json())["models"][0]
    return f"{model['backend']['name']} {model['precision']}"


async def answers(server: Server, images: list[tuple[str, bytes]]) -> list[list[int]]:
    """The top-5 classes of each image, one request at a time."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for name, data in images:
            kind = "image/png" if name.endswith(".png") else "image/jpeg"
            body = form(data, name, kind)
            async with session.post(server.url, data=body, headers=MULTIPART) as response:
                text = await response.text()
                if response.status != 200:
                    raise RuntimeError(f"{server.name}: {name} -> {response.status} {text[:200]}")
                out.append(top5(json.loads(text)))
    return out


async def point(server: Server, photos: list[bytes], concurrency: int, load: Load) -> Measured:
    """A closed loop of ``concurrency`` clients, measured for ``load.seconds`` once steady.

    Steady means past the warm-up and after every client has had its first answer: a server
    that queues is then measured with its queue full, not while the queue fills up.
    """
    outcomes: list[Outcome] = []
    began, end = time.perf_counter(), math.inf  # end is set when the window opens
    first_answers, steady = 0, asyncio.Event()
    bodies = [form(photo, "p.jpg", "image/jpeg") for photo in photos]
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int) -> None:
            nonlocal first_answers
            sent = index
            while time.perf_counter() < end:
                body = bodies[sent % len(bodies)]
                sent += concurrency
                started = time.perf_counter()
                pause = load.backoff_s
                try:
                    async with session.post(server.url, data=body, headers=MULTIPART) as r:
                        await r.read()
                        status = str(r.status)
                        pause = retry_after(r.headers.get("Retry-After"), load)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                outcomes.append(Outcome(started, time.perf_counter(), status))
                if sent == index + concurrency:  # this client's first answer
                    first_answers += 1
                    if first_answers == concurrency:
                        steady.set()
                if status != OK:
                    await asyncio.sleep(pause)

        clients = asyncio.gather(*(client(i) for i in range(concurrency)))
        with suppress(TimeoutError):
            await asyncio.wait_for(steady.wait(), load.max_warmup_s)
        await asyncio.sleep(began + load.warmup_s - time.perf_counter())
        start = time.perf_counter()
        end = start + window_seconds(load, outcomes, start - began)
        server_cpu, client_cpu = await _cpu_over(server, end)
        await clients  # the drain: in-flight requests finish, uncounted, before the next point
    rss, pss = server.tree.peak_mib(start, end)
    return Measured(
        concurrency=concurrency,
        start=start,
        warmup_s=start - began,
        steady=steady.is_set(),
        outcomes=[o for o in outcomes if start <= o.finished < end],
        seconds=end - start,
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
        peak_rss_mib=rss,
        peak_pss_mib=pss,
    )


def window_seconds(load: Load, warmup: list[Outcome], warmup_s: float) -> float:
    """``load.seconds``, longer where the warm-up's rate of 200s needs it for ``min_answers``."""
    answered = sum(o.status == OK for o in warmup)
    if not load.min_answers or not answered:
        return load.seconds
    needed = load.min_answers / (answered / warmup_s)
    return min(max(load.seconds, needed), 4 * load.seconds)


@dataclass
class Measured:
    """One window of load on one server: the requests that finished inside it, and the costs."""

    concurrency: int
    start: float
    warmup_s: float
    steady: bool
    outcomes: list[Outcome]
    seconds: float
    server_cpu_s: float
    client_cpu_s: float
    peak_rss_mib: float | None
    peak_pss_mib: float | None


def pooled(windows: list[Measured]) -> dict[str, Any]:
    """A point of the report from one or more windows at the same concurrency (rounds)."""
    seconds = sum(w.seconds for w in windows)
    server_cpu = sum(w.server_cpu_s for w in windows)
    # Laid end to end, the windows are one window of their summed length.
    outcomes, offset = [], 0.0
    for window in windows:
        shift = offset - window.start
        outcomes += [
            Outcome(o.started + shift, o.finished + shift, o.status) for o in window.outcomes
        ]
        offset += window.seconds
    summary = summarize(outcomes, (0.0, seconds))
    answered = sum(n for status, n in summary["statuses"].items() if status.isdigit())
    return {
        "concurrency": windows[0].concurrency,
        "warmup_s": windows[0].warmup_s,
        "steady": all(w.steady for w in windows),
        "rounds": len(windows),
        **summary,
        "server_cpu_percent": 100 * server_cpu / seconds,
        # Per answered request, refusals included: what one request costs the host.
        "server_cpu_ms_per_request": 1000 * server_cpu / max(answered, 1),
        "client_cpu_percent": 100 * sum(w.client_cpu_s for w in windows) / seconds,
        "peak_rss_mib": _peak(w.peak_rss_mib for w in windows),
        "peak_pss_mib": _peak(w.peak_pss_mib for w in windows),
    }


def _peak(values: Iterable[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def retry_after(header: str | None, load: Load) -> float:
    try:
        return min(float(header), load.max_retry_after_s) if header else load.backoff_s
    except ValueError:  # an HTTP date: not sent by any server here
        return load.backoff_s


async def _cpu_over(server: Server, end: float) -> tuple[float, float]:
    """CPU seconds of the server's process tree and of this client, from now until ``end``."""
    me = psutil.Process()
    tree_before, me_before = server.tree.cpu(), me.cpu_times()
    await asyncio.sleep(end - time.perf_counter())
    tree_after, me_after = server.tree.cpu(), me.cpu_times()
    mine = me_after.user + me_after.system - me_before.user - me_before.system
    return cpu_seconds(tree_before, tree_after), mine
