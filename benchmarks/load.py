"""HTTP load generator (aiohttp, closed loop) against a real ``python -m app`` on 127.0.0.1.

Each point runs ``concurrency`` workers for at most ``seconds`` and ``max_requests``; it reports
images/s, latency percentiles, errors by status, the server's batch sizes (from /metrics), the
server's peak RSS and the client's own CPU use, so a saturated client is never mistaken for a
slow server.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0


def photo(width: int, height: int, seed: int) -> bytes:
    """Photo-like JPEG: smooth colour gradients plus sensor noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127
        + 100
        * np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6))
        * np.cos(y / rng.uniform(40, 200) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def digits(count: int) -> list[bytes]:
    from model.data import digit_images

    out = []
    for image in digit_images()[2][:count]:
        buffer = io.BytesIO()
        image.resize((64, 64)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def image_pool() -> list[tuple[str, bytes]]:
    """8 photos at 500x375, 2 at 1920x1080, 2 digit PNGs: mostly web-sized photos."""
    pool = [(f"photo{i}.jpg", photo(500, 375, i)) for i in range(8)]
    pool += [(f"hd{i}.jpg", photo(1920, 1080, 100 + i)) for i in range(2)]
    pool += [(f"digit{i}.png", data) for i, data in enumerate(digits(2))]
    return pool


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str


def cpu_named() -> str:
    """The CPU beside a figure: ``lscpu``'s model name and whether it has AVX-512."""
    described = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(
        (line.split(":", 1)[1].strip() for line in described.splitlines() if "Model name" in line),
        "unknown CPU",
    )
    return f"{name} ({'AVX-512' if 'avx512' in described else 'AVX2, no AVX-512'})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def run_server(model_path: Path | None, *, stderr: Any = None, **settings: str) -> Iterator[Server]:
    """``model_path`` None: ``settings`` name a ``model_repository`` instead; ``stderr``: where
    the server's logs go (``subprocess.Popen``'s, default inherited)."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **({"RESNET_SERVE_MODEL_PATH": str(model_path)} if model_path is not None else {}),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_LOG_LEVEL": "warning",
        "RESNET_SERVE_GRPC_PORT": "0",  # benchmarks.grpc gives one where it measures gRPC
        **{f"RESNET_SERVE_{k.upper()}": v for k, v in settings.items()},
    }
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stderr=stderr)
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        asyncio.run(_wait_ready(server))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}")
            try:
                async with session.get(f"{server.url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s")


def batch_histogram(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "resnet_serve_batch_size":
            return {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    return {}


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Model calls per batch-size bucket during the run (cumulative buckets -> per bucket)."""
    out, previous = {}, 0.0
    for le in after:
        cumulative = after[le] - before.get(le, 0.0)
        if cumulative - previous:
            out[le] = cumulative - previous
        previous = cumulative
    return out


async def _peak_rss(pid: int, stop: asyncio.Event) -> int:
    process, peak = psutil.Process(pid), 0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    return peak


async def run_point(
    server: Server,
    pool: list[tuple[str, bytes]],
    concurrency: int,
    images_per_request: int,
    seconds: float,
    max_requests: int = 100_000,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.get(f"{server.url}/metrics") as response:
            before = batch_histogram(await response.text())
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        counter = iter(range(max_requests))
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() >= deadline:
                    return
                form = aiohttp.FormData()
                for j in range(images_per_request):
                    name, data = pool[(i * images_per_request + j) % len(pool)]
                    kind = "image/png" if name.endswith(".png") else "image/jpeg"
                    form.add_field("files", data, filename=name, content_type=kind)
                started = time.perf_counter()
                try:
                    async with session.post(f"{server.url}/predict", data=form) as response:
                        await response.read()
                        statuses[str(response.status)] += 1
                        if response.status == 200:
                            latencies.append(time.perf_counter() - started)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

        me, stop = psutil.Process(), asyncio.Event()
        served = psutil.Process(server.process.pid)
        rss_task = asyncio.ensure_future(_peak_rss(server.process.pid, stop))
        cpu_before, wall_started = me.cpu_times(), time.perf_counter()
        server_before = served.cpu_times()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - wall_started
        cpu_after, server_after = me.cpu_times(), served.cpu_times()
        stop.set()
        peak_rss = await rss_task
        async with session.get(f"{server.url}/metrics") as response:
            after = batch_histogram(await response.text())
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    client_cpu = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / wall
    server_cpu_s = (
        server_after.user + server_after.system - server_before.user - server_before.system
    )
    answered = sum(v for k, v in statuses.items() if k.isdigit())
    return {
        "concurrency": concurrency,
        "images_per_request": images_per_request,
        "seconds": wall,
        "requests_ok": len(latencies),
        "images_per_s": len(latencies) * images_per_request / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": dict(statuses),
        "batch_sizes": batch_distribution(before, after),
        "server_peak_rss_mib": peak_rss / 2**20,
        "client_cpu_percent": 100 * client_cpu,
        "server_cpu_percent": 100 * server_cpu_s / wall,
        # Server CPU per answered request, refusals included: what a request costs the host.
        "server_cpu_ms_per_request": 1000 * server_cpu_s / max(answered, 1),
    }
