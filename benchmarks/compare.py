"""Settings side by side: servers started at once, loaded in turn, round after round.

    PYTHONPATH=. .venv/bin/python -m benchmarks.compare --concurrency 1 --rounds 4 \\
        off:RESNET_SERVE_ORT_SPINNING=off adaptive handwritten

Each spec is NAME[:VAR=VALUE,...]: one of the peer servers of benchmarks.peers when NAME is one
(``handwritten``, ``litserve``, ...), else ours, with those environment variables on top. On a
shared machine the speed drifts over minutes; interleaving the servers round by round lets the
drift hit every one alike, so their figures compare where one server after another would not.
Load, measurement and pooling are benchmarks.peers' own (``point``, ``pooled``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp

from benchmarks.load import photo
from benchmarks.peers.drive import Load, Measured, point, pooled, wait_ready
from benchmarks.peers.servers import ROOT, SERVERS, Batching, Server, start

FIRST_PORT = 8140


def launch(spec: str, index: int, model: Path, workdir: Path) -> Server:
    name, _, assignments = spec.partition(":")
    settings = dict(a.partition("=")[::2] for a in assignments.split(",") if a)
    kind = name if name in SERVERS else "ours"
    server = start(kind, model, FIRST_PORT + index, Batching(), workdir, settings)
    server.name = name
    return server


async def compare(servers: list[Server], args: argparse.Namespace) -> None:
    photos = [photo(500, 375, seed) for seed in range(8)]
    window = Load(warmup_s=1.0, seconds=args.seconds)
    limits = {}
    for server in servers:
        await wait_ready(server, photos[0], window)
        limits[server.name] = await batch_limit(server)
    measured: dict[str, list[Measured]] = {server.name: [] for server in servers}
    for _ in range(args.rounds):
        for server in servers:
            measured[server.name].append(await point(server, photos, args.concurrency, window))
    print(f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s, pooled:")
    for name, windows in measured.items():
        p = pooled(windows)
        rounds = " ".join(f"{len(w.outcomes) / w.seconds:.0f}" for w in windows)
        print(
            f"{name:14s} {p['images_per_s']:7.1f} img/s  p50 {p['p50_ms']:7.2f} ms  "
            f"p99 {p['p99_ms']:7.2f} ms  CPU {p['server_cpu_ms_per_request']:6.2f} ms/request  "
            f"(answers/s by round: {rounds}){limits[name]}"
        )


async def batch_limit(server: Server) -> str:
    """Ours' batch limit as warm-up fitted it (servers warming at once fit smaller ones)."""
    if server.name in SERVERS and server.name != "ours":
        return ""
    url = server.url.replace("/predict", "/v1/model")
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return f", batch limit {(await response.json())['batching']['batch_limit']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="NAME[:VAR=VALUE,...]")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model.onnx")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="compare-") as workdir:
        servers = [launch(s, i, args.model, Path(workdir)) for i, s in enumerate(args.specs)]
        try:
            asyncio.run(compare(servers, args))
        finally:
            for server in servers:
                server.tree.stop()


if __name__ == "__main__":
    main()
