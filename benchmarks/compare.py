"""Settings side by side: servers started at once, loaded in turn, round after round.

    PYTHONPATH=. .venv/bin/python -m benchmarks.compare --concurrency 1 --rounds 4 \\
        off:RESNET_SERVE_ORT_SPINNING=off adaptive:RESNET_SERVE_ORT_SPINNING=adaptive handwritten

Each spec is NAME[:VAR=VALUE,...]: ours (``python -m app``) with those environment variables, or
the hand-written peer when NAME is ``handwritten``. On a shared machine the speed drifts over
minutes; interleaving the servers round by round lets the drift hit every one alike, so the
medians compare where one server after another would not. Prints images/s, p50, mean and server
CPU per request (the server's processes, its children included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from benchmarks.load import photo
from benchmarks.peers.drive import form

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


@dataclass
class Round:
    per_s: float
    p50_ms: float
    mean_ms: float
    cpu_ms: float


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str


def start(spec: str, port: int, model: Path) -> Server:
    name, _, assignments = spec.partition(":")
    env = dict(os.environ, RESNET_SERVE_MODEL_PATH=str(model), RESNET_SERVE_PORT=str(port))
    env["RESNET_SERVE_LOG_LEVEL"] = "warning"
    command = [sys.executable, "-m", "app"]
    if name == "handwritten":
        command = [str(PEERS_PYTHON), "-m", "benchmarks.peers.handwritten"]
        env |= {"PEER_MODEL_PATH": str(model), "PEER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        env[key] = value
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return Server(name, process, f"http://127.0.0.1:{port}/predict")


async def load(url: str, image: bytes, clients: int, seconds: float) -> list[float]:
    """Closed loop: each client posts the image again as soon as it has its answer."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def client(stop: float) -> None:
            while time.perf_counter() < stop:
                began = time.perf_counter()
                async with session.post(url, data=form(image, "a.jpg", "image/jpeg")) as answer:
                    await answer.read()
                    if answer.status != 200:
                        raise RuntimeError(f"{url}: status {answer.status}")
                latencies.append(time.perf_counter() - began)

        stop = time.perf_counter() + seconds
        await asyncio.gather(*(client(stop) for _ in range(clients)))
    return latencies


def cpu_seconds(process: psutil.Process) -> float:
    family = [process, *process.children(recursive=True)]
    return sum(p.cpu_times().user + p.cpu_times().system for p in family)


async def ready(server: Server, image: bytes, timeout_s: float = 300) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}")
        try:
            await load(server.url, image, 1, 0.2)
            return
        except (aiohttp.ClientError, RuntimeError):
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after {timeout_s} s")


async def compare(servers: list[Server], args: argparse.Namespace) -> dict[str, list[Round]]:
    image = photo(500, 375, 0)
    for server in servers:
        await ready(server, image)
    rounds: dict[str, list[Round]] = {server.name: [] for server in servers}
    for _ in range(args.rounds):
        for server in servers:
            process = psutil.Process(server.process.pid)
            await load(server.url, image, args.concurrency, 1.0)  # settle at this load first
            before = cpu_seconds(process)
            latencies = await load(server.url, image, args.concurrency, args.seconds)
            cpu_ms = (cpu_seconds(process) - before) * 1000 / len(latencies)
            rounds[server.name].append(
                Round(
                    per_s=len(latencies) / args.seconds,
                    p50_ms=statistics.median(latencies) * 1000,
                    mean_ms=statistics.mean(latencies) * 1000,
                    cpu_ms=cpu_ms,
                )
            )
    return rounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="NAME[:VAR=VALUE,...]")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model.onnx")
    args = parser.parse_args(argv)
    servers = [start(spec, 8140 + i, args.model) for i, spec in enumerate(args.specs)]
    try:
        rounds = asyncio.run(compare(servers, args))
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=60)
    print(f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s, medians:")
    for name, measured in rounds.items():
        median = {
            field: statistics.median(getattr(r, field) for r in measured)
            for field in ("per_s", "p50_ms", "mean_ms", "cpu_ms")
        }
        print(
            f"{name:14s} {median['per_s']:7.1f} img/s  p50 {median['p50_ms']:6.2f} ms  "
            f"mean {median['mean_ms']:6.2f} ms  CPU {median['cpu_ms']:5.2f} ms/request  "
            f"(rounds: {' '.join(f'{r.per_s:.0f}' for r in measured)})"
        )


if __name__ == "__main__":
    main()
