"""HTTP load on a real ``python -m app``: 500x375 JPEGs from closed-loop clients, driven by the
peers benchmark's own client (``benchmarks.peers.drive``), with 1 and N worker processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.drive import Load, point, pooled, wait_ready
from benchmarks.peers.servers import ROOT, ProcessTree, Server


def environment(model: Path, port: int, workers: int, settings: dict[str, str]) -> dict[str, str]:
    # PYTHONPATH keeps whatever the caller added (the GPU machine's carried wheels in /tmp/site).
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env |= {
        "RESNET_SERVE_MODEL_PATH": str(model),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_LOG_LEVEL": "warning",
        "RESNET_SERVE_GRPC_PORT": "0",
        **{f"RESNET_SERVE_{key.upper()}": value for key, value in settings.items()},
    }
    # Only where it matters: a server without the multi-worker front end rejects the variable
    # (Settings refuses unknown RESNET_SERVE_* names), so 1 worker never sets it.
    if workers > 1:
        env["RESNET_SERVE_WORKERS"] = str(workers)
    return env


def start(model: Path, workers: int, settings: dict[str, str], workdir: Path) -> Server:
    port = _free_port()
    log = workdir / f"server-{workers}w.log"
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=environment(model, port, workers, settings),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/predict"
    return Server(f"ours-{workers}w", process, ProcessTree(process.pid), url, log, started)


async def sweep(
    model: Path,
    workers: int,
    settings: dict[str, str],
    photos: list[bytes],
    concurrency: list[int],
    load: Load,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as workdir:
        server = start(model, workers, settings, Path(workdir))
        try:
            startup_s = await wait_ready(server, photos[0], load)
            points = []
            for clients in concurrency:
                points.append(pooled([await point(server, photos, clients, load)]))
                print(json.dumps({"workers": workers, **points[-1]}), flush=True)
        except RuntimeError as exc:  # the server died or never answered: say so, keep going
            return {"workers": workers, "error": str(exc)[-2000:]}
        finally:
            server.tree.stop()
            server.process.wait(timeout=30)  # reaped: psutil waited, Popen must know too
    return {"workers": workers, "startup_s": startup_s, "points": points}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
