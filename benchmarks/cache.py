"""Repeated images: what the answer cache (RESNET_SERVE_CACHE_BYTES) gives, hits against misses.

    PYTHONPATH=. .venv/bin/python -m benchmarks.cache \
        [--model artifacts/bench/resnet50-random-fp32.onnx] [--seconds 15]

One server with a 64 MiB cache; 16 closed-loop clients post a 500x375 JPEG to /predict:

- misses: every request's bytes are new (the same photo with 8 random bytes after its end, which
  decoders ignore), so each is decoded and computed;
- hits: the same bytes every time, after one request has computed them.

Interleaved (miss, hit, miss, hit). Server time per request is the server's own
resnet_serve_request_duration_seconds (sum / count over the run). Writes
benchmarks/results/cache.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.load import cpu_named, photo, run_server
from tests.helpers.metrics import scrape

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLIENTS = 16


def server_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of /predict's server-side request durations so far."""
    family = scrape(url)["resnet_serve_request_duration_seconds"]
    total = count = 0.0
    for sample in family.samples:
        if sample.labels.get("endpoint") != "/predict":
            continue
        if sample.name.endswith("_sum"):
            total = sample.value
        elif sample.name.endswith("_count"):
            count = sample.value
    return total, count


async def closed_loop(url: str, jpeg: bytes, seconds: float, fresh: bool) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    caches: dict[str, int] = {}
    latencies: list[float] = []
    before = server_seconds(url)
    stop = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop:
            body = jpeg + os.urandom(8) if fresh else jpeg
            form = aiohttp.FormData()
            form.add_field("files", body, filename="p.jpg", content_type="image/jpeg")
            started = time.perf_counter()
            async with session.post(f"{url}/predict", data=form) as response:
                await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
            hit = response.headers.get("x-cache", "-")
            caches[hit] = caches.get(hit, 0) + 1

    began = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - began
    after = server_seconds(url)
    served = after[1] - before[1]
    return {
        "images_per_s": round(statuses.get("200", 0) / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "server_ms_per_request": round(1000 * (after[0] - before[0]) / served, 3),
        "statuses": statuses,
        "x_cache": caches,
    }


async def measure(url: str, seconds: float) -> dict[str, Any]:
    jpeg = photo(500, 375, 0)
    await closed_loop(url, jpeg, 3, fresh=True)  # warm
    runs: dict[str, list[dict[str, Any]]] = {"miss": [], "hit": []}
    for _ in range(2):
        runs["miss"].append(await closed_loop(url, jpeg, seconds, fresh=True))
        runs["hit"].append(await closed_loop(url, jpeg, seconds, fresh=False))
    return runs


def report(result: dict[str, Any]) -> str:
    lines = [
        "# Repeated images: the answer cache",
        "",
        f"Measured {result['when']} on {result['cpu']}, `{result['model']}`, one worker, "
        f"RESNET_SERVE_CACHE_BYTES=64 MiB, {CLIENTS} closed-loop clients posting a 500x375 JPEG "
        "to /predict, misses and hits interleaved. `PYTHONPATH=. .venv/bin/python -m "
        "benchmarks.cache`.",
        "",
        "| run | img/s | p50 ms | p99 ms | server ms / request | X-Cache |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(2):
        for kind in ("miss", "hit"):
            run = result["runs"][kind][i]
            lines.append(
                f"| {kind} ({i + 1}) | {run['images_per_s']} | {run['p50_ms']} | {run['p99_ms']} "
                f"| {run['server_ms_per_request']} | {run['x_cache']} |"
            )
    ratios = [
        hit["images_per_s"] / miss["images_per_s"]
        for miss, hit in zip(result["runs"]["miss"], result["runs"]["hit"], strict=True)
    ]
    lines += [
        "",
        f"Hits / misses in images per second, pair by pair: {ratios[0]:.1f}x, {ratios[1]:.1f}x.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/bench/resnet50-random-fp32.onnx")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--out", default="cache")
    args = parser.parse_args()
    model = ROOT / args.model
    with run_server(model, cache_bytes=str(64 * 2**20), log_level="warning") as server:
        runs = asyncio.run(measure(server.url, args.seconds))
    result = {
        "when": time.strftime("%Y-%m-%d"),
        "cpu": cpu_named(),
        "model": args.model,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
