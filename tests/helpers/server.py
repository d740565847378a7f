"""``python -m app`` as a real uvicorn process on 127.0.0.1, and requests to it."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    lines: queue.Queue[dict[str, object]] = field(default_factory=queue.Queue)
    seen: list[dict[str, object]] = field(default_factory=list)

    def wait_for_log(self, predicate: Callable[[dict[str, object]], bool]) -> dict[str, object]:
        """Block on the server's log stream (an event), not on a clock."""
        while True:
            entry = self.lines.get(timeout=STARTUP_TIMEOUT_S)
            self.seen.append(entry)
            if predicate(entry):
                return entry


def _pump(stream: Iterator[str], lines: queue.Queue[dict[str, object]]) -> None:
    for line in stream:
        try:
            lines.put(json.loads(line))
        except json.JSONDecodeError:
            lines.put({"message": line.rstrip()})


def message_is(text: str) -> Callable[[dict[str, object]], bool]:
    return lambda entry: str(entry.get("message", "")).startswith(text)


@contextmanager
def run_server(model_path: Path | None, **settings: str) -> Iterator[Server]:
    """``settings`` as ``RESNET_SERVE_*`` variables; an upper-case name (``OTEL_*``) as it is."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        # Where the GPU machine finds carried wheels and the CUDA libraries (make gpu-check).
        **{k: os.environ[k] for k in ("PYTHONPATH", "LD_LIBRARY_PATH") if k in os.environ},
        # auto's timings where this test session keeps them (tests/conftest.py).
        **{k: os.environ[k] for k in ("RESNET_SERVE_TUNING_CACHE_DIR",) if k in os.environ},
        "RESNET_SERVE_MODEL_PATH": str(model_path or ""),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_MAX_BATCH_SIZE": "8",
        "RESNET_SERVE_MAX_WAIT_MS": "10",
        # Lanes and threads as on two cores, whatever the machine: the same test, the same load.
        "RESNET_SERVE_CONCURRENT_BATCHES": "2",
        "RESNET_SERVE_INTRA_OP_THREADS": "1",
        "RESNET_SERVE_DECODE_THREADS": "2",
        # Batches up to max_batch_size, whatever this machine's warm-up timings fit.
        "RESNET_SERVE_FLAT_BATCH_MS": "1e9",
        # Servers run side by side: gRPC only where a test gives it a port (grpc_port).
        "RESNET_SERVE_GRPC_PORT": "0",
        # ONNX Runtime, as the tests' faults and timings assume; test_app_backends tries the rest.
        "RESNET_SERVE_BACKEND": "onnxruntime",
        **{k if k.isupper() else f"RESNET_SERVE_{k.upper()}": v for k, v in settings.items()},
    }
    if "model_repository" in settings:  # a repository replaces model_path
        del env["RESNET_SERVE_MODEL_PATH"]
    process = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    server = Server(process, f"http://127.0.0.1:{port}")
    pump = threading.Thread(target=_pump, args=(process.stderr, server.lines), daemon=True)
    pump.start()
    try:
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        pump.join(timeout=30)
        process.stderr.close()


def post_image(url: str, data: bytes, name: str) -> httpx.Response:
    files = [("files", (name, data, "image/png"))]
    return httpx.post(f"{url}/predict", files=files, params={"top_k": 3}, timeout=60)
