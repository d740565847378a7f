"""Faults around a real ``python -m app`` that must not cost a request: here, logs that cannot be
written (stderr on a full disk, ``/dev/full``: every write fails with ENOSPC)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers.models import image_bytes
from tests.helpers.server import ROOT, STARTUP_TIMEOUT_S, free_port


def test_a_full_disk_under_the_logs_costs_no_request(model_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RESNET_SERVE_MODEL_PATH": str(model_path),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_GRPC_PORT": "0",
        "RESNET_SERVE_LOG_LEVEL": "debug",  # as much logging as there can be
    }
    with open("/dev/full", "w") as full:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=full, stderr=full
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "the server died with its logs unwritable"
            time.sleep(0.2)
        files = [("files", ("x.png", image_bytes(1), "image/png"))]
        answers = [httpx.post(f"{url}/predict", files=files, timeout=30) for _ in range(20)]
        refused = httpx.post(f"{url}/predict", content=b"not an image", timeout=30)
    finally:
        process.terminate()
        status = process.wait(timeout=60)
    assert [a.status_code for a in answers] == [200] * 20
    assert refused.status_code == 415
    assert status == 0
