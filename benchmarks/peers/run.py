"""Ours against LitServe, BentoML, Ray Serve and a hand-written FastAPI script, in one run.

Run by ``python -m benchmarks.peers`` (benchmarks/peers/__main__.py has the commands).

Each server on the same ONNX artifact: start-up time to the first 200, top-1 on the check
images (examples/ and the load photos) against ours, then one 500x375 JPEG per request at each
concurrency. By default each server runs alone, in turn, in two passes (``--passes``), the second
in reverse order, each point pooled over both, so that a drift in a shared machine's speed hits
them alike; with ``--rounds N`` all are up at once and each point is N windows per server, the
servers taking turns. Writes benchmarks/results/peers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.load import photo
from benchmarks.peers.drive import Load, Measured, answers, point, pooled, served_by, wait_ready
from benchmarks.peers.report import agreement, markdown, plot
from benchmarks.peers.servers import PEERS_VENV, ROOT, SERVERS, Batching, Server, start

MODELS = {
    "fp32": ROOT / "artifacts/bench/resnet50-random-fp32.onnx",
    "int8": ROOT / "artifacts/bench/resnet50-random-int8.onnx",
}
QUICK_MODELS = {"digits": ROOT / "artifacts/model.onnx"}
CONCURRENCY = (1, 16, 64, 256)
RESULTS = ROOT / "benchmarks" / "results"
PEER_PACKAGES = ("litserve", "bentoml", "ray", "fastapi", "uvicorn", "onnxruntime")


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    models = _models(args.model, args.quick)
    load = (
        Load(warmup_s=1.0, max_warmup_s=5.0, seconds=3.0)
        if args.quick
        else Load(seconds=args.seconds, min_answers=args.min_answers)
    )
    batching = Batching(args.max_batch_size, args.batch_wait_ms, args.ours_wait_ms)
    photos = [photo(500, 375, seed) for seed in range(8)]
    checks = [(p.name, p.read_bytes()) for p in sorted((ROOT / "examples").glob("*.png"))]
    checks += [(f"photo{i}.jpg", data) for i, data in enumerate(photos)]
    began_all = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "settings": {"load": vars(load), "batching": vars(batching), "quick": args.quick},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
        for model_name, path in models.items():
            # One round: each server alone, started and stopped in turn, in ``passes`` passes
            # (the order reversed each time), each point pooled over the passes, so a drift in
            # the machine's speed during the run hits every server alike, to first order. More
            # rounds: all up at once, taking turns at each point.
            passes = args.passes if args.rounds == 1 else 1
            groups = []
            for index in range(passes):
                order = args.servers if index % 2 == 0 else args.servers[::-1]
                groups += [[name] for name in order] if args.rounds == 1 else [order]
            window = replace(
                load, seconds=load.seconds / passes, min_answers=load.min_answers // passes
            )
            found: list[dict[str, Any]] = []
            for group in groups:
                found += asyncio.run(
                    _run_servers(
                        group,
                        path,
                        batching,
                        window,
                        args.concurrency,
                        photos,
                        checks,
                        workdir,
                        args.rounds,
                    )
                )
            runs = [merged([r for r in found if r["server"] == name]) for name in args.servers]
            ours = [r["top5"] for r in runs if r["server"] == "ours" and "top5" in r]
            reference = ours[0] if ours else None
            for run in runs:
                run["model"] = model_name
                if "top5" in run:
                    run["agreement"] = agreement(run["top5"], reference)
                skip = ("top5", "points")
                print(json.dumps({k: v for k, v in run.items() if k not in skip}), flush=True)
                results["runs"].append(run)
    results["elapsed_s"] = time.perf_counter() - began_all
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    plot(results, RESULTS / f"{args.out}.png")


def merged(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's passes as one run: each point pooled over them, the first start-up time
    (every pass's in ``startups_s``); a pass that failed makes the run that failure."""
    failed = [run for run in passes if "error" in run]
    if failed:
        return failed[0]
    run = {k: v for k, v in passes[0].items() if k != "windows"}
    run["startups_s"] = [p["startup_s"] for p in passes]
    if "served_by" in run:
        run["served_by"] = [p["served_by"] for p in passes]
    run["points"] = [
        pooled([w for p in passes for w in p["windows"][clients]])
        for clients in passes[0]["windows"]
    ]
    return run


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1+3 s per point, digits model")
    parser.add_argument("--seconds", type=float, default=Load.seconds, help="measured s/point")
    parser.add_argument(
        "--min-answers", type=int, default=600, help="200s a point aims at (up to 4x --seconds)"
    )
    parser.add_argument("--servers", type=_names, default=list(SERVERS), help="comma-separated")
    parser.add_argument("--concurrency", type=_numbers, default=list(CONCURRENCY))
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH, repeatable")
    parser.add_argument("--max-batch-size", type=int, default=Batching.max_batch_size)
    parser.add_argument("--batch-wait-ms", type=float, default=Batching.wait_ms, help="peers'")
    parser.add_argument("--ours-wait-ms", type=float, help="ours' max_wait_ms (default: ours')")
    parser.add_argument(
        "--passes", type=int, default=2, help="alone: passes over the servers, order reversed"
    )
    parser.add_argument("--out", default="peers", help="results file stem")
    parser.add_argument(
        "--rounds", type=int, default=1, help="windows per point, servers taking turns (>1: all up)"
    )
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    names = text.split(",")
    unknown = sorted(set(names) - set(SERVERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown servers {unknown}; choose from {SERVERS}")
    return names


def _numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def _models(given: list[str], quick: bool) -> dict[str, Path]:
    pairs = [m.split("=", 1) for m in given]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--model takes NAME=PATH, got {given}")
    models = {k: Path(v) for k, v in pairs} or (QUICK_MODELS if quick else MODELS)
    missing = [str(path) for path in models.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"missing model files {missing} (make bench-models; make build)")
    return models


def _versions() -> dict[str, Any]:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{PEERS_VENV} is missing: make peers-venv")
    script = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps({{p: m.version(p) for p in {PEER_PACKAGES!r}}}))"
    )
    found = subprocess.run([python, "-c", script], capture_output=True, check=True)
    peers = json.loads(found.stdout)
    ours = {p: version(p) for p in ("fastapi", "uvicorn", "onnxruntime")}
    if peers["onnxruntime"] != ours["onnxruntime"]:
        raise SystemExit(
            f"onnxruntime {peers['onnxruntime']} in {PEERS_VENV} but {ours['onnxruntime']} here: "
            "pin the same version in benchmarks/peers/requirements.txt"
        )
    return {"ours": ours, "peers": peers}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _run_servers(
    names: list[str],
    model: Path,
    batching: Batching,
    load: Load,
    concurrency: list[int],
    photos: list[bytes],
    checks: list[tuple[str, bytes]],
    workdir: str,
    rounds: int,
) -> list[dict[str, Any]]:
    """Start the servers in turn, then measure each concurrency as ``rounds`` windows per
    server, the servers taking turns: each run's ``windows`` by concurrency (``merged``)."""
    servers: dict[str, Server] = {}
    runs: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            began = time.perf_counter()
            server = start(name, model, free_port(), batching, Path(workdir))
            try:
                startup = await wait_ready(server, photos[0], load)
                top5 = await answers(server, checks)
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                # One peer that fails to start or answer must not cost the others' numbers.
                server.tree.stop()
                runs[name] = {"server": name, "error": f"{type(exc).__name__}: {exc}"}
                continue
            servers[name] = server
            runs[name] = {"server": name, "startup_s": startup, "top5": top5, "windows": {}}
            if name == "ours":
                runs[name]["served_by"] = await served_by(server.url)
            runs[name]["elapsed_s"] = time.perf_counter() - began
        window = replace(
            load, seconds=load.seconds / rounds, min_answers=load.min_answers // rounds
        )
        for clients in concurrency:
            measured: dict[str, list[Measured]] = {name: [] for name in servers}
            for _ in range(rounds):
                for name, server in servers.items():
                    measured[name].append(await point(server, photos, clients, window))
            for name, windows in measured.items():
                runs[name]["windows"][clients] = windows
                print(json.dumps({"server": name, **pooled(windows)}), flush=True)
    finally:
        for server in servers.values():
            server.tree.stop()
    return [runs[name] for name in names]
