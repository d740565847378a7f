"""A request's own deadline on a real server: behind a queue that needs longer it is answered
504 before its body is decoded; the protocol's ``timeout`` parameter too; bad values are 422."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.load import closed_loop
from tests.helpers.metrics import scrape, wait_for_gauge
from tests.helpers.models import image_bytes
from tests.helpers.server import Server, message_is, run_server

PNG = image_bytes(1)
SETTINGS = {"max_batch_size": "8", "intra_op_threads": "1", "decode_threads": "2"}


def dropped(server: Server) -> dict[str, float]:
    family = scrape(server.url)["resnet_serve_deadline_dropped"]
    return {s.labels["stage"]: s.value for s in family.samples if s.name.endswith("_total")}


def predict(server: Server, **options: object) -> httpx.Response:
    files = {"files": ("a.png", PNG, "image/png")}
    return httpx.post(f"{server.url}/predict", files=files, timeout=30, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(slow_model: Path) -> Iterator[Server]:
    with run_server(slow_model, **SETTINGS) as running:
        running.wait_for_log(message_is("ready"))
        yield running


def test_a_short_deadline_behind_a_long_queue_is_504_before_its_decode(server: Server) -> None:
    assert predict(server, params={"timeout_ms": "5000"}).status_code == 200  # idle: in time
    before = dropped(server)
    busy = threading.Thread(
        target=lambda: asyncio.run(closed_loop(server.url, PNG, concurrency=48, seconds=3))
    )
    busy.start()
    # A queue of over a second of work on the slow model (about 20 ms an image on one core).
    wait_for_gauge(server.url, "resnet_serve_pending_images", 32)
    started = time.monotonic()
    by_query = predict(server, params={"timeout_ms": "50"})
    by_header = predict(server, headers={"X-Request-Timeout-Ms": "50"})
    took = time.monotonic() - started
    busy.join()
    for response in (by_query, by_header):
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "timeout"
        assert "deadline" in response.json()["error"]["message"]
    assert took < 1.0  # answered at once, not after the queue
    after = dropped(server)
    assert after.get("door", 0) - before.get("door", 0) >= 2  # never read, never decoded


def test_the_protocols_timeout_parameter_is_its_deadline(server: Server) -> None:
    before = dropped(server)
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(PNG).decode()],
            }
        ],
        "parameters": {"timeout": 1},  # microseconds, as Triton's
    }
    name = httpx.get(f"{server.url}/v1/model").json()["name"]
    response = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=30)
    assert response.status_code == 504, response.text
    after = dropped(server)  # before its decode, or in the queue: never by the model
    assert sum(after.get(s, 0) - before.get(s, 0) for s in ("decode", "queue")) >= 1
    body["parameters"] = {"timeout": 5_000_000}
    assert httpx.post(f"{server.url}/v2/models/{name}/infer", json=body).status_code == 200


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan", ""])
def test_a_timeout_that_is_no_positive_number_is_422(server: Server, value: str) -> None:
    for response in (
        predict(server, params={"timeout_ms": value}),
        predict(server, headers={"X-Request-Timeout-Ms": value}),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_parameter"
