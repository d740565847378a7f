"""Does the front end scale with cores? One worker against several, with real JPEGs.

    PYTHONPATH=. .venv/bin/python -m benchmarks.workers       # about 2 minutes on 2 cores

Our server (``python -m app``, the digits model by default, every setting at its default) in
five set-ups, each alone: one worker pinned to core 0 (``taskset -c 0``), two workers on cores
0-1 (``taskset -c 0,1``; each worker pins itself to one of them, ``pin_workers``), one worker
against two on the whole machine, and two on the whole machine with ``pin_workers=false``. A
worker's lanes and threads follow the cores it may use (one core: one lane, one thread).
Closed-loop aiohttp clients (benchmarks.peers.drive) send one 500x375 photo-like JPEG per request;
the client runs on the same machine, unpinned, and its own CPU is reported beside the server's.
Writes benchmarks/results/workers.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.load import photo
from benchmarks.peers.drive import Load, point, pooled, wait_ready
from benchmarks.peers.run import cpu_model, free_port
from benchmarks.peers.servers import ROOT, Batching, Server, start

RESULTS = ROOT / "benchmarks" / "results"
CONCURRENCY = (16, 64)


@dataclass(frozen=True)
class Setup:
    name: str
    workers: int
    cpus: str | None  # taskset's list, or None for the whole machine
    pin_workers: bool = True


SETUPS = (
    Setup("1 worker, core 0", 1, "0"),
    Setup("2 workers, cores 0-1", 2, "0,1"),
    Setup("1 worker, whole machine", 1, None),
    Setup("2 workers, whole machine", 2, None),
    Setup("2 workers, whole machine, unpinned", 2, None, pin_workers=False),
)
# (faster, slower) set-ups whose ratio the report gives
RATIOS = ((1, 0), (3, 2), (3, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts/model.onnx")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured s per point")
    parser.add_argument("--concurrency", type=lambda t: [int(n) for n in t.split(",")])
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"missing model {args.model} (make build)")
    load = Load(warmup_s=2.0, max_warmup_s=10.0, seconds=args.seconds)
    photos = [photo(500, 375, seed) for seed in range(8)]
    began = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "model": str(
            args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
        ),
        "load": vars(load),
        "client": "aiohttp, closed loop, unpinned, same machine",
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="workers-") as workdir:
        for setup in SETUPS:
            run = asyncio.run(_run(setup, args, load, photos, Path(workdir)))
            print(json.dumps({k: v for k, v in run.items() if k != "points"}), flush=True)
            results["runs"].append(run)
    results["elapsed_s"] = time.perf_counter() - began
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "workers.md").write_text(markdown(results))


async def _run(
    setup: Setup, args: argparse.Namespace, load: Load, photos: list[bytes], workdir: Path
) -> dict[str, Any]:
    server = _start(setup, args.model, workdir)
    try:
        startup = await wait_ready(server, photos[0], load)
        # The first 200 came from the first warm worker: a point's connections are made at its
        # start and kept, so every worker must be listening before the first point.
        await _listening_workers(server, setup.workers)
        points = []
        for clients in args.concurrency or CONCURRENCY:
            before = server.tree.cpu()
            measured = pooled([await point(server, photos, clients, load)])
            # Whether the kernel spread the connections: CPU seconds of each process, largest
            # first (the supervisor's share is near zero).
            after = server.tree.cpu()
            split = sorted((after[pid] - before.get(pid, 0.0) for pid in after), reverse=True)
            points.append(measured | {"cpu_s_by_process": [round(s, 2) for s in split]})
            print(json.dumps({"setup": setup.name, **points[-1]}), flush=True)
    finally:
        server.tree.stop()
    return {**vars(setup), "startup_s": startup, "points": points}


def _start(setup: Setup, model: Path, workdir: Path) -> Server:
    settings = {
        "RESNET_SERVE_WORKERS": str(setup.workers),
        "RESNET_SERVE_PIN_WORKERS": str(setup.pin_workers).lower(),
    }
    pin = ["taskset", "-c", setup.cpus] if setup.cpus else []
    server = start("ours", model, free_port(), Batching(), workdir, settings, prefix=pin)
    server.name = setup.name
    return server


async def _listening_workers(server: Server, count: int) -> None:
    """Returns once each of the ``count`` workers has its listening socket (a worker listens
    only when warm). Workers are the spawned processes, not the supervisor or multiprocessing's
    resource tracker; with one worker, the server process itself."""
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        members = server.tree.members()
        spawned = [p for p in members if "spawn_main" in " ".join(p.cmdline())] or members[:1]
        listening = [
            p for p in spawned if any(c.status == "LISTEN" for c in p.net_connections("tcp"))
        ]
        if len(listening) == count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name}: not all {count} workers listening after 120 s")


def markdown(results: dict[str, Any]) -> str:
    concurrency = [p["concurrency"] for p in results["runs"][0]["points"]]
    head = " | ".join(f"c={c}" for c in concurrency)
    lines = [
        f"# Workers: JPEG throughput against cores ({results['date']})",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cpus']} cores, load average "
        f"at start {results['machine']['load_average_at_start'][0]:.1f}; model "
        f"`{results['model']}`; {results['client']}; {results['load']['seconds']:.0f} s per "
        "point after warm-up. Images/s (p99 ms); server CPU % / client CPU % below.",
        "",
        f"| set-up | {head} |",
        "|---|" + "---|" * len(concurrency),
    ]
    for run in results["runs"]:
        cells = " | ".join(
            f"{p['images_per_s']:.0f} ({p['p99_ms'] or 0:.0f}) "
            f"<br>{p['server_cpu_percent']:.0f}% / {p['client_cpu_percent']:.0f}%"
            for p in run["points"]
        )
        lines.append(f"| {run['name']} | {cells} |")
    lines += [
        "",
        "CPU seconds of each server process over each point (were both workers busy?):",
        "",
    ]
    for run in results["runs"]:
        if run["workers"] > 1:
            split = "; ".join(
                f"c={p['concurrency']}: {p['cpu_s_by_process']}" for p in run["points"]
            )
            lines.append(f"- {run['name']}: {split}")
    rate = {r["name"]: [p["images_per_s"] for p in r["points"]] for r in results["runs"]}
    lines += ["", "Ratios within this run:", ""]
    for faster, slower in RATIOS:
        a, b = SETUPS[faster].name, SETUPS[slower].name
        ratios = ", ".join(
            f"c={c}: {x / y:.2f}x" for c, x, y in zip(concurrency, rate[a], rate[b], strict=True)
        )
        lines.append(f"- {a} / {b}: {ratios}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
