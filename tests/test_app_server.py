"""``python -m app`` as a real uvicorn process: readiness, concurrency, metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.preprocess import Recipe, decode
from tests.conftest import build_model, image_bytes

ROOT = Path(__file__).resolve().parent.parent
# ~20 ms per image on one core: warm-up (36 images for batch sizes 1..8) takes most of a
# second, long enough to observe readiness being 503 first, and batches form under load.
CROP = 64
STARTUP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow.onnx"
    return build_model(path, crop_size=CROP, conv_layers=6, width=64)


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
def run_server(model_path: Path, **settings: str) -> Iterator[Server]:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RESNET_SERVE_MODEL_PATH": str(model_path),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_MAX_BATCH_SIZE": "8",
        "RESNET_SERVE_MAX_WAIT_MS": "10",
        "RESNET_SERVE_INTRA_OP_THREADS": "1",
        "RESNET_SERVE_DECODE_THREADS": "2",
        **{f"RESNET_SERVE_{k.upper()}": v for k, v in settings.items()},
    }
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


def offline_top(session: ort.InferenceSession, data: bytes, k: int) -> list[tuple[int, float]]:
    recipe = Recipe(resize_size=CROP + CROP // 4, crop_size=CROP)
    (probabilities,) = session.run(["probabilities"], {"images": decode(data, recipe)[None]})
    order = np.argsort(-probabilities[0], kind="stable")[:k]
    return [(int(i), float(probabilities[0][i])) for i in order]


def post_image(url: str, data: bytes, name: str) -> httpx.Response:
    files = [("files", (name, data, "image/png"))]
    return httpx.post(f"{url}/predict", files=files, params={"top_k": 3}, timeout=60)


def test_ready_after_warm_up_then_concurrent_predictions_match_offline(slow_model: Path) -> None:
    with run_server(slow_model) as server:
        server.wait_for_log(message_is("Uvicorn running"))
        # The port opens while warm-up is still running: readiness must say no.
        first = httpx.get(f"{server.url}/readyz")
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        server.wait_for_log(message_is("ready"))
        assert httpx.get(f"{server.url}/readyz").status_code == 200

        payloads = {f"img{i}.png": image_bytes(i) for i in range(32)}
        with ThreadPoolExecutor(max_workers=16) as clients:
            futures = {
                name: clients.submit(post_image, server.url, data, name)
                for name, data in payloads.items()
            }
            responses = {name: future.result() for name, future in futures.items()}
        metrics = httpx.get(f"{server.url}/metrics").text

    session = ort.InferenceSession(str(slow_model), providers=["CPUExecutionProvider"])
    for name, response in responses.items():
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert result["filename"] == name
        expected = offline_top(session, payloads[name], 3)
        got = [(p["class_id"], p["score"]) for p in result["predictions"]]
        assert [c for c, _ in got] == [c for c, _ in expected], name
        assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-4), name
    assert (
        len({r.json()["results"][0]["predictions"][0]["class_id"] for r in responses.values()}) > 3
    )

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    buckets = {
        s.labels["le"]: s.value
        for s in families["resnet_serve_batch_size"].samples
        if s.name.endswith("_bucket")
    }
    # Every request carried one image: batches above one were formed across requests.
    assert buckets["+Inf"] - buckets["1.0"] > 0


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(slow_model: Path) -> None:
    with run_server(slow_model) as server:
        server.wait_for_log(message_is("ready"))
        payloads = [image_bytes(i) for i in range(12)]
        with ThreadPoolExecutor(max_workers=len(payloads)) as clients:
            pending = [clients.submit(post_image, server.url, data, "x.png") for data in payloads]
            in_flight = wait_until_in_flight(server.url, len(payloads))
            server.process.send_signal(signal.SIGTERM)
            statuses = [future.result().status_code for future in pending]
        assert server.process.wait(timeout=60) == 0
        server.wait_for_log(message_is("drained"))
    assert in_flight >= 1
    assert statuses == [200] * len(payloads)


def wait_until_in_flight(url: str, count: int) -> float:
    """Scrape until all ``count`` requests have reached the server; returns those in flight.

    Across processes there is no event to wait on, so each scrape is one blocking round trip.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        families = {
            f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        }
        in_flight = families["resnet_serve_requests_in_flight"].samples[0].value - 1
        done = sum(
            s.value
            for s in families["resnet_serve_requests"].samples
            if s.name.endswith("_total") and s.labels["endpoint"] == "/predict"
        )
        if in_flight + done >= count:
            return in_flight
    raise AssertionError(f"{count} requests never reached the server")


@pytest.mark.parametrize(
    ("content", "extra_env", "status", "fragment"),
    [
        (None, {}, 1, "model file not found"),
        (b"garbage" * 100, {}, 1, "cannot load ONNX model"),
        (None, {"RESNET_SERVE_MAX_WAIT": "3"}, 2, "unknown settings"),
        (None, {"RESNET_SERVE_PROVIDERS": "tpu"}, 2, "providers"),
    ],
    ids=["missing-model", "corrupt-model", "misspelt-setting", "bad-setting"],
)
def test_bad_start_up_is_one_line_and_nonzero_exit(
    tmp_path: Path, content: bytes | None, extra_env: dict[str, str], status: int, fragment: str
) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    env = {"PATH": os.environ.get("PATH", ""), "RESNET_SERVE_MODEL_PATH": str(path), **extra_env}
    result = subprocess.run(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("resnet-serve: ")
    assert fragment in lines[0]
