"""Benchmarks: in-process ceiling and HTTP load, fp32 vs int8, batcher on vs off; overload.

    PYTHONPATH=. python -m benchmarks [--quick] [--sections load,overload]

Needs the 224x224 random-init artifacts in artifacts/bench/ (``make bench-models``);
writes benchmarks/results/{results.json,results.md,results.png}. The overload section drives
ours, the hand-written script and LitServe (``make peers-venv``) on the digits model with the
same 500x375 JPEGs at 1x, 4x and 16x the saturating concurrency (16), and writes
benchmarks/results/overload.{json,md,png}. The swap section (benchmarks.swap) loads, switches
and unloads model versions of the digits model under load: benchmarks/results/swap.{json,md,png}.
The tracing section (benchmarks.tracing) measures tracing off against on:
benchmarks/results/tracing.{json,md}; the grpc section (benchmarks.grpc) the protocol over gRPC
against REST: benchmarks/results/grpc.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
from pathlib import Path
from typing import Any

import psutil

from app.settings import Settings
from benchmarks import grpc, swap, tracing
from benchmarks.ceiling import ceiling
from benchmarks.load import image_pool, run_point, run_server
from benchmarks.peers import run as peers

ARTIFACTS = {
    "fp32": Path("artifacts/bench/resnet50-random-fp32.onnx"),
    "int8": Path("artifacts/bench/resnet50-random-int8.onnx"),
}
BATCHERS = {"batcher-on": 8, "batcher-off": 1}
CONCURRENCY = (1, 4, 16, 64)
IMAGES_PER_REQUEST = (1, 4)
RESULTS = Path(__file__).resolve().parent / "results"


SECTIONS = ("load", "overload", "swap", "tracing", "grpc")
# c=16 saturates the digits model on 2 cores (the measurement): 1x, 4x and 16x that.
# Three windows per point, the servers taking turns, so that drift in the machine's speed hits
# each alike.
OVERLOAD = [
    "--servers",
    "ours,handwritten,litserve",
    "--concurrency",
    "1,16,64,256",
    "--rounds",
    "3",
]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="3 s per load point, 1 s per batch")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if "load" in sections:
        load_section(args.quick)
    if "overload" in sections:
        digits = ["--model", "digits=artifacts/model.onnx", "--out", "overload"]
        peers.main([*OVERLOAD, *digits, *(["--seconds", "4"] if args.quick else [])])
    if "swap" in sections:
        swap.main(["--step-s", "4" if args.quick else "8"])
    if "tracing" in sections:
        tracing.main(["--seconds", "4" if args.quick else "12"])
    if "grpc" in sections:
        grpc.main(["--seconds", "4" if args.quick else "10"])


def load_section(quick: bool) -> None:
    seconds, ceiling_seconds = (3.0, 1.0) if quick else (10.0, 3.0)
    pool = image_pool()
    results: dict[str, Any] = {
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()},
        "quick": quick,
        "ceiling": {},
        "load": [],
    }
    for precision, path in ARTIFACTS.items():
        results["ceiling"][precision] = ceiling(Settings(model_path=path), ceiling_seconds)
        for batcher, max_batch in BATCHERS.items():
            with run_server(path, max_batch_size=str(max_batch)) as server:
                for per_request in IMAGES_PER_REQUEST:
                    for concurrency in CONCURRENCY:
                        point = asyncio.run(
                            run_point(server, pool, concurrency, per_request, seconds)
                        )
                        point |= {"precision": precision, "batcher": batcher}
                        print(json.dumps(point), flush=True)
                        results["load"].append(point)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "results.md").write_text(markdown(results))
    plot(results, RESULTS / "results.png")


def markdown(results: dict[str, Any]) -> str:
    lines = ["## In-process ceiling (ONNX Runtime, preprocessed inputs)", ""]
    lines += [
        "| precision | batch | lanes | images/s | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for precision, rows in results["ceiling"].items():
        lines += [
            f"| {precision} | {r['batch_size']} | {r['lanes']} | {r['images_per_s']:.1f} "
            f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |"
            for r in rows
        ]
    lines += ["", "## HTTP load (python -m app on 127.0.0.1)", ""]
    lines += [
        "| precision | batcher | imgs/req | conc | images/s | p50 ms | p95 ms | p99 ms "
        "| statuses | batch sizes (le: calls) | server peak RSS MiB | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['precision']} | {p['batcher']} | {p['images_per_request']} | {p['concurrency']} "
        f"| {p['images_per_s']:.1f} | {p['p50_ms']:.0f} | {p['p95_ms']:.0f} | {p['p99_ms']:.0f} "
        f"| {_compact(p['statuses'])} | {_compact(p['batch_sizes'])} "
        f"| {p['server_peak_rss_mib']:.0f} | {p['client_cpu_percent']:.0f} |"
        for p in results["load"]
    ]
    return "\n".join(lines) + "\n"


def _compact(counts: dict[str, float]) -> str:
    return " ".join(f"{k}:{v:g}" for k, v in counts.items())


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[dict[str, Any]]] = {}
    for point in results["load"]:
        label = f"{point['precision']} {point['batcher']} x{point['images_per_request']}"
        series.setdefault(label, []).append(point)
    for label, points in series.items():
        concurrency = [p["concurrency"] for p in points]
        left.plot(concurrency, [p["images_per_s"] for p in points], marker="o", label=label)
        right.plot(concurrency, [p["p99_ms"] for p in points], marker="o", label=label)
    for precision, rows in results["ceiling"].items():
        best = max(r["images_per_s"] for r in rows)
        left.axhline(best, linestyle="--", linewidth=0.8, label=f"{precision} ceiling")
    for axis, ylabel in ((left, "images/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
