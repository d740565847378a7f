"""What tracing costs: the digits demo served with tracing off, on with nothing sampled, and on
with every request sampled and exported over OTLP/HTTP, at one client and at saturation.

    PYTHONPATH=. .venv/bin/python -m benchmarks --sections tracing [--quick]
    PYTHONPATH=. .venv/bin/python -m benchmarks.tracing --seconds 12 --passes 2

The spans go to an OTLP/HTTP receiver in a process of its own (``benchmarks.otlp_sink``), which
decodes them as a collector would and counts them. Each configuration is a fresh server; the
configurations take turns, then again in reverse order, and each point is pooled over both
passes, so drift in the machine's speed hits each alike.
Writes benchmarks/results/tracing.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import ROOT, free_port, image_pool, run_point, run_server

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = Path("artifacts/model.onnx")
CONFIGS: dict[str, dict[str, str]] = {
    "off": {},
    "on, none sampled": {"OTEL_TRACES_EXPORTER": "otlp"},
    "on, all sampled": {"OTEL_TRACES_EXPORTER": "otlp", "RESNET_SERVE_TRACE_SAMPLE_RATIO": "1"},
}
CONCURRENCY = (1, 16, 64)  # one client, saturation (16 on 2 cores), 4x over it


@contextmanager
def sink() -> Any:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.otlp_sink", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    process.stdout.readline()  # "listening"
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(config: str, seconds: float, endpoint: str) -> list[dict[str, Any]]:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **CONFIGS[config]}
    saved = {key: os.environ.get(key) for key in environ}
    os.environ.update(environ)
    pool = [item for item in image_pool() if item[0].startswith("photo")]  # 500x375 JPEGs
    try:
        with run_server(MODEL) as server:
            asyncio.run(run_point(server, pool, 16, 1, 2.0))  # warm
            points = []
            for concurrency in CONCURRENCY:
                point = asyncio.run(run_point(server, pool, concurrency, 1, seconds))
                point["config"] = config
                print(json.dumps(point), flush=True)
                points.append(point)
            return points
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pooled(points: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(p["seconds"] for p in points)
    answered = sum(p["requests_ok"] for p in points)
    return {
        "images_per_s": answered / seconds,
        # A percentile of pooled passes is not their mean; the mean of each pass's is close enough
        # here, and the table says which.
        "p50_ms": float(np.mean([p["p50_ms"] for p in points])),
        "p99_ms": float(np.mean([p["p99_ms"] for p in points])),
        "server_cpu_ms_per_request": float(
            np.mean([p["server_cpu_ms_per_request"] for p in points])
        ),
        "statuses": [p["statuses"] for p in points],
    }


def markdown(
    table: dict[str, dict[int, dict[str, Any]]], spans: int, args: argparse.Namespace
) -> str:
    lines = [
        "## Tracing: off, on with nothing sampled, on with every request traced",
        "",
        f"`PYTHONPATH=. .venv/bin/python -m benchmarks.tracing --seconds {args.seconds:g} "
        f"--passes {args.passes}`: the digits demo, 500x375 JPEGs, one server per configuration, "
        f"{args.passes} passes (the second in reverse order), each point pooled over the passes "
        f"(p50/p99: the mean of the passes'). Spans received by the OTLP/HTTP receiver: {spans}.",
        "",
        "| tracing | clients | images/s | vs off | p50 ms | p99 ms | server CPU ms/request |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, points in table.items():
        for concurrency, point in points.items():
            off = table["off"][concurrency]["images_per_s"]
            lines.append(
                f"| {config} | {concurrency} | {point['images_per_s']:.1f} | "
                f"{point['images_per_s'] / off:.2f} | {point['p50_ms']:.1f} | "
                f"{point['p99_ms']:.1f} | {point['server_cpu_ms_per_request']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--seconds", type=float, default=12.0, help="per point and pass")
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    started = time.perf_counter()
    with sink() as (endpoint, receiver):
        order = list(CONFIGS)
        for number in range(args.passes):
            for config in order if number % 2 == 0 else order[::-1]:
                runs[config] += measure(config, args.seconds, endpoint)
        receiver.terminate()
        assert receiver.stdout is not None
        spans = int(receiver.stdout.read().split()[-1] or 0)
    table = {
        config: {c: pooled([p for p in points if p["concurrency"] == c]) for c in CONCURRENCY}
        for config, points in runs.items()
    }
    RESULTS.mkdir(exist_ok=True)
    results = {"runs": runs, "table": table, "spans_received": spans, "args": vars(args)}
    (RESULTS / "tracing.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / "tracing.md").write_text(markdown(table, spans, args))
    print(markdown(table, spans, args))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
