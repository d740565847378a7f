"""A stop under load loses nothing and leaves no client guessing: keep-alive clients on a real
``python -m app`` get 200, or 503 ``shutting_down``, each with ``Connection: close`` from the
stop on, then connection refused; never a read error on a request they had sent."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.helpers.models import image_bytes
from tests.helpers.server import message_is, run_server
from tests.helpers.workers import start_workers

CLIENTS = 16
PNG = image_bytes(4)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_keep_alive_load_answers_every_request_it_was_sent(
    model_path: Path, workers: int
) -> None:
    outcomes: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    lock = threading.Lock()
    flowing = threading.Event()  # every client is getting answers: the stop comes under load
    settings = {"workers": str(workers), "decode_threads": "1"}

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as session:
            while True:
                try:
                    response = session.post("/predict", files={"f": ("x.png", PNG, "image/png")})
                except httpx.ConnectError:  # the server is gone: nothing was sent
                    with lock:
                        outcomes["refused"] += 1
                    return
                except httpx.HTTPError as exc:  # sent, and no answer: what must never happen
                    with lock:
                        outcomes[type(exc).__name__] += 1
                    continue
                with lock:
                    outcomes[str(response.status_code)] += 1
                    if outcomes["200"] >= 4 * CLIENTS:
                        flowing.set()
                    if response.status_code == 503:
                        refusals[response.json()["error"]["code"]] += 1
                        refusals[
                            "retry-after" if "retry-after" in response.headers else "no hint"
                        ] += 1

    with run_server(model_path, **settings) as server:
        if workers > 1:
            start_workers(server)
        else:
            server.wait_for_log(message_is("ready"))
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        assert flowing.wait(timeout=60)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        status = server.process.wait(timeout=60)
    assert status == 0
    assert outcomes["200"] > 0
    assert outcomes["refused"] == CLIENTS
    assert set(outcomes) <= {"200", "503", "refused"}, outcomes
    # Every refusal after the stop says why, when to retry, and that the connection closes.
    assert set(refusals) <= {"shutting_down", "retry-after", "connection: close"}, refusals
