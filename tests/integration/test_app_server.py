"""``python -m app`` as a real uvicorn process: readiness, concurrency, metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.metrics import families, scrape
from tests.helpers.models import SLOW_CROP, image_bytes, offline_top
from tests.helpers.server import ROOT, STARTUP_TIMEOUT_S, message_is, post_image, run_server


def test_live_then_ready_then_concurrent_predictions_match_offline(slow_model: Path) -> None:
    with run_server(slow_model) as server:
        server.wait_for_log(message_is("Uvicorn running"))
        # Live as soon as the port opens. That readiness is 503 until warm-up ends is proven
        # with an explicitly gated warm-up (test_app_routes), not by racing one here.
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

    for name, response in responses.items():
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert result["filename"] == name
        expected = offline_top(slow_model, payloads[name], 3, SLOW_CROP)
        got = [(p["class_id"], p["score"]) for p in result["predictions"]]
        assert [c for c, _ in got] == [c for c, _ in expected], name
        assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-4), name
    assert (
        len({r.json()["results"][0]["predictions"][0]["class_id"] for r in responses.values()}) > 3
    )

    found = families(metrics)
    buckets = {
        s.labels["le"]: s.value
        for s in found["resnet_serve_batch_size"].samples
        if s.name.endswith("_bucket")
    }
    # Every request carried one image: batches above one were formed across requests.
    assert buckets["+Inf"] - buckets["1.0"] > 0


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(slow_model: Path) -> None:
    # One lane, one image a batch: the 12 requests compute one after another (some 250 ms), so
    # they are still in flight after all have arrived, whichever scrape sees that (with two lanes
    # of batches of 8 they were all done within ~100 ms, and a scrape could miss the window).
    with run_server(slow_model, concurrent_batches="1", max_batch_size="1") as server:
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
        found = scrape(url)
        in_flight: float = found["resnet_serve_requests_in_flight"].samples[0].value - 1
        done = sum(
            s.value
            for s in found["resnet_serve_requests"].samples
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
        (None, {"OTEL_TRACES_EXPORTER": "zipkin"}, 2, "OTEL_TRACES_EXPORTER='zipkin'"),
        (None, {"OTEL_TRACES_SAMPLER": "sometimes"}, 2, "OTEL_TRACES_SAMPLER='sometimes'"),
        (
            None,
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            2,
            "'http/json'",
        ),
    ],
    ids=[
        "missing-model",
        "corrupt-model",
        "misspelt-setting",
        "bad-setting",
        "trace-exporter",
        "trace-sampler",
        "otlp-protocol",
    ],
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
