"""``RESNET_SERVE_WORKERS=2 python -m app``: two real worker processes on one port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import onnx
import psutil
import pytest

from app.process.cpus import usable_cpus
from tests.helpers.metrics import families
from tests.helpers.models import build_model, image_bytes
from tests.helpers.server import ROOT, STARTUP_TIMEOUT_S, Server, message_is, post_image, run_server
from tests.helpers.workers import start_workers

WORKERS = {"workers": "2", "decode_threads": "1"}


def predict_all(url: str, count: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=16) as clients:
        futures = [clients.submit(post_image, url, image_bytes(i), "x.png") for i in range(count)]
        return [future.result().status_code for future in futures]


def stop(server: Server) -> int:
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(timeout=60)
    server.wait_for_log(message_is("stopped"))
    return status


def scrape_until(url: str, done: Callable[[str], bool]) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if done(metrics := httpx.get(f"{url}/metrics").text):
            return metrics
    raise AssertionError(f"/metrics never showed the expected values; last:\n{metrics}")


def arrived(metrics: str) -> float:
    """/predict requests in flight or answered (the scrape itself is in flight too)."""
    found = families(metrics)
    in_flight: float = found["resnet_serve_requests_in_flight"].samples[0].value - 1
    answered = found.get("resnet_serve_requests")
    done: float = sum(
        s.value
        for s in (answered.samples if answered else [])
        if s.name.endswith("_total") and s.labels["endpoint"] == "/predict"
    )
    return in_flight + done


def samples(metrics: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = families(metrics)
    return {tuple(sorted(s.labels.items())): s.value for s in found[name].samples}


def test_both_workers_serve_and_metrics_sum_over_them(slow_model: Path) -> None:
    with run_server(slow_model, **WORKERS) as server:
        pids = start_workers(server)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        cores = [set(psutil.Process(pids[index]).cpu_affinity()) for index in (0, 1)]
        statuses = predict_all(server.url, 48)
        # Callback gauges reach the shared files every SAMPLE_INTERVAL_S: the scrape after the
        # last answer may see a worker's previous sample, the next ones its final one.
        metrics = scrape_until(
            server.url, lambda text: samples(text, "resnet_serve_pending_images")[()] == 0
        )
        assert stop(server) == 0
        assert not any(psutil.pid_exists(pid) for pid in pids.values())

    assert statuses == [200] * 48
    mine = set(os.sched_getaffinity(0))
    if len(mine) % 2 == 0 and usable_cpus() == len(mine):  # each on its own half
        assert cores[0] | cores[1] == mine
        assert len(cores[0]) == len(cores[1])
        assert not cores[0] & cores[1]
    else:  # uneven cores or a CPU quota: left where the kernel puts them
        assert cores == [mine, mine]
    served_by = {
        entry.get("worker")
        for entry in server.seen
        if entry.get("message") == "request" and entry.get("path") == "/predict"
    }
    assert served_by == {0, 1}
    # Whichever worker answered the scrape, it counted both workers' work.
    version = (("model", "tiny-test"), ("version", "7"))
    assert samples(metrics, "resnet_serve_images")[version] == 48
    predicted = samples(metrics, "resnet_serve_requests")
    assert predicted[(("endpoint", "/predict"), ("status", "200"))] == 48
    # An Info has no multiprocess form: the scraped worker's own, one series.
    assert len(samples(metrics, "resnet_serve_model_info")) == 1


def test_sigterm_drains_every_worker_then_exits_zero(slow_model: Path) -> None:
    with run_server(slow_model, **WORKERS) as server:
        start_workers(server)
        with ThreadPoolExecutor(max_workers=16) as clients:
            pending = [
                clients.submit(post_image, server.url, image_bytes(i), "x.png") for i in range(16)
            ]
            scrape_until(server.url, lambda text: arrived(text) >= 16)
            server.process.send_signal(signal.SIGTERM)
            statuses = [future.result().status_code for future in pending]
        assert server.process.wait(timeout=60) == 0
        server.wait_for_log(message_is("stopped"))
    assert statuses == [200] * 16
    drained = {e.get("worker") for e in server.seen if e.get("message") == "drained"}
    assert drained == {0, 1}


def test_a_killed_worker_is_replaced_and_only_warm_workers_take_requests(
    slow_model: Path,
) -> None:
    with run_server(slow_model, **WORKERS) as server:
        pids = start_workers(server)
        os.kill(pids[0], signal.SIGKILL)
        server.wait_for_log(message_is("worker exited; starting a new one"))
        # While the new worker starts and warms up, the other one answers everything.
        with ThreadPoolExecutor(max_workers=4) as clients:
            during = [
                clients.submit(post_image, server.url, image_bytes(i), "x.png") for i in range(8)
            ]
            replacement = server.wait_for_log(message_is("worker started"))
            statuses = [future.result().status_code for future in during]
        after = predict_all(server.url, 16)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert stop(server) == 0

    assert replacement["worker"] == 0
    assert replacement["pid"] != pids[0]
    assert statuses == [200] * 8
    assert after == [200] * 16
    # The dead worker's in-flight gauge left with it; its counts stay.
    assert samples(metrics, "resnet_serve_requests_in_flight")[()] == 1  # this scrape


def test_a_worker_that_never_serves_stops_the_server_with_exit_one(tmp_path: Path) -> None:
    # Batch dimension fixed at 1: the supervisor's checks pass, each worker's warm-up of
    # batch 2 fails, and a replacement would fail the same way.
    model = onnx.load(build_model(tmp_path / "batch1.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "batch1.onnx")
    with run_server(tmp_path / "batch1.onnx", **WORKERS) as server:
        assert server.process.wait(timeout=60) == 1
        server.wait_for_log(message_is("stopped"))
    assert any(e.get("message") == "worker exited before it served; stopping" for e in server.seen)
    assert not any(e.get("message") == "worker started" for e in server.seen)


@pytest.mark.parametrize("problem", ["missing-model", "port-in-use"])
def test_bad_start_up_is_one_line_before_any_worker_starts(tmp_path: Path, problem: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        model = tmp_path / "model.onnx"
        if problem == "port-in-use":
            build_model(model)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "RESNET_SERVE_MODEL_PATH": str(model),
            "RESNET_SERVE_HOST": "127.0.0.1",
            "RESNET_SERVE_PORT": str(taken.getsockname()[1]),
            "RESNET_SERVE_WORKERS": "2",
        }
        result = subprocess.run(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("resnet-serve: ")
    assert ("model file not found" if problem == "missing-model" else "cannot listen") in lines[0]
