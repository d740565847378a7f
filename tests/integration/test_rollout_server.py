"""Rollouts on a real server (1 and 2 workers): canary shares, sticky callers, shadows no client
sees, automatic rollbacks with no failed request, promotion under load, and bad requests."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image

from tests.helpers.models import LABELS, POISON, build_model, image_bytes
from tests.helpers.repository import NAME, add_version
from tests.helpers.server import Server, free_port, message_is, run_server
from tests.helpers.workers import start_workers

ROLLOUT = f"/v2/repository/models/{NAME}/rollout"
IMAGES = [image_bytes(seed) for seed in range(24)]
# Version 3's classes in the reverse order: a candidate that answers with the wrong label for
# nearly every image while passing its own reference check (it is consistent with itself).
SHUFFLED = LABELS[::-1]


def repository(tmp_path: Path) -> Path:
    """Version 1, which serves."""
    root = tmp_path / "repository"
    add_version(root, 1, labels=LABELS)
    return root


def add_candidates(root: Path) -> None:
    """Version 2 (the same weights and classes as 1) and 3 (its classes shuffled)."""
    add_version(root, 2, labels=LABELS)
    add_version(root, 3, labels=SHUFFLED)


def served(root: Path, workers: int = 1, **settings: str) -> AbstractContextManager[Server]:
    return run_server(None, model_repository=str(root), workers=str(workers), **settings)


def ready(server: Server, workers: int) -> None:
    if workers > 1:
        start_workers(server)
    else:
        server.wait_for_log(message_is("serving"))


Answer = tuple[int, int, str]  # (client, status, the version that answered)


def load(
    url: str,
    clients: int,
    seconds: float,
    headers: Callable[[int], dict[str, str]] = lambda _: {},
    during: Callable[[], None] | None = None,
) -> list[Answer]:
    """``clients`` keep-alive clients posting images for ``seconds``; ``during`` runs meanwhile,
    from one second in."""
    answers: list[Answer] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=30, headers=headers(index)) as http:
            sent = 0
            while time.monotonic() < stop:
                image = IMAGES[(index * 7 + sent) % len(IMAGES)]
                sent += 1
                response = http.post("/predict", files={"files": ("a.png", image, "image/png")})
                version = response.json().get("model_version", "") if response.is_success else ""
                with lock:
                    answers.append((index, response.status_code, version))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    if during is not None:
        time.sleep(1)
        during()
    for thread in threads:
        thread.join()
    return answers


def state(server: Server) -> dict[str, object]:
    response = httpx.get(server.url + ROLLOUT)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def state_when(server: Server, holds: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The rollout's state once ``holds`` is true of it: the workers send their figures every
    0.1 s (app.repository.link), so the last requests' arrive a moment after their answers."""
    deadline = time.monotonic() + 10
    while not holds(figures := state(server)):
        assert time.monotonic() < deadline, figures
        time.sleep(0.05)
    return figures


def start(server: Server, **plan: object) -> dict[str, object]:
    response = httpx.put(server.url + ROLLOUT, json=plan, timeout=60)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def versions(answers: list[Answer]) -> Counter[str]:
    return Counter(version for _, status, version in answers if status == 200)


def statuses(answers: list[Answer]) -> Counter[int]:
    return Counter(status for _, status, _ in answers)


def index(server: Server) -> list[str]:
    entries = httpx.post(server.url + "/v2/repository/index", json={"ready": True}).json()
    return sorted(entry["version"] for entry in entries)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_canary_answers_its_share_and_promotes_under_load(tmp_path: Path, workers: int) -> None:
    root = repository(tmp_path)
    with served(root, workers) as server:
        ready(server, workers)
        add_candidates(root)
        plan = start(server, candidate="2", mode="canary", percent=20)
        assert (plan["baseline"], plan["candidate"], plan["status"]) == ("1", "2", "running")
        assert index(server) == ["1", "2"]  # both warm

        answers = load(server.url, 8, 4)
        assert statuses(answers) == {200: len(answers)}
        share = versions(answers)["2"] / len(answers)
        assert 0.15 <= share <= 0.25, versions(answers)
        figures = state_when(  # every answer counted, by the version that gave it
            server,
            lambda f: (
                f["versions"]["baseline"]["requests"] + f["versions"]["candidate"]["requests"]
                == len(answers)
            ),
        )
        assert figures["compared"]
        assert figures["agreement"] == 1.0

        promoted: list[httpx.Response] = []
        answers = load(
            server.url,
            8,
            3,
            during=lambda: promoted.append(
                httpx.post(server.url + ROLLOUT + "/promote", timeout=60)
            ),
        )
        assert promoted[0].status_code == 200, promoted[0].text
        assert promoted[0].json()["status"] == "promoted"
        assert statuses(answers) == {200: len(answers)}
        after = load(server.url, 4, 1)
        assert versions(after) == {"2": len(after)}
        assert index(server) == ["2"]  # the baseline unloaded once promoted


@pytest.mark.parametrize("workers", [1, 2])
def test_sticky_callers_each_see_one_version(tmp_path: Path, workers: int) -> None:
    root = repository(tmp_path)
    keys = [f"caller-key-{i:02d}-5e1c9a" for i in range(12)]
    (tmp_path / "keys").write_text("".join(f"{key} name=team\n" for key in keys))
    (tmp_path / "admin").write_text("admin-key-77d0e2\n")
    admin = {"Authorization": "Bearer admin-key-77d0e2"}
    with served(
        root,
        workers,
        api_keys_file=str(tmp_path / "keys"),
        repository_api_keys_file=str(tmp_path / "admin"),
    ) as server:
        ready(server, workers)
        add_candidates(root)
        plan = {"candidate": "2", "mode": "canary", "percent": 50, "sticky": True}
        response = httpx.put(server.url + ROLLOUT, json=plan, headers=admin, timeout=60)
        assert response.status_code == 200, response.text

        answers = load(server.url, 12, 3, lambda i: {"Authorization": f"Bearer {keys[i]}"})
        assert statuses(answers) == {200: len(answers)}
        seen: dict[int, set[str]] = {}
        for client, _, version in answers:
            seen.setdefault(client, set()).add(version)
        assert all(len(each) == 1 for each in seen.values()), seen
        assert {v for each in seen.values() for v in each} == {"1", "2"}  # 12 callers, 50%


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shadow_is_seen_by_no_client_and_agrees(tmp_path: Path, workers: int) -> None:
    root = repository(tmp_path)
    with served(root, workers) as server:
        ready(server, workers)
        add_candidates(root)
        start(server, candidate="2", mode="shadow", compare_share=1.0)
        answers = load(server.url, 2, 3)
        assert statuses(answers) == {200: len(answers)}
        assert versions(answers) == {"1": len(answers)}
        # The candidate's requests are its copies: once each is compared, the counts meet.
        figures = state_when(
            server,
            lambda f: f["compared"] > 0 and f["versions"]["candidate"]["requests"] == f["compared"],
        )
        assert figures["status"] == "running"
        assert figures["agreement"] == 1.0
        assert figures["mean_probability_difference"] == 0.0


@pytest.mark.parametrize("mode", ["canary", "shadow"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_wrong_candidate_is_rolled_back_with_no_failed_request(
    tmp_path: Path, workers: int, mode: str
) -> None:
    root = repository(tmp_path)
    with served(root, workers) as server:
        ready(server, workers)
        add_candidates(root)
        plan: dict[str, object] = {"candidate": "3", "mode": mode, "min_requests": 30}
        plan |= {"percent": 50} if mode == "canary" else {}
        start(server, compare_share=1.0, **plan)
        answers = load(server.url, 4, 5)
        assert statuses(answers) == {200: len(answers)}
        server.wait_for_log(message_is("rollout rolled back"))
        figures = state(server)
        assert figures["status"] == "rolled_back"
        assert "agreement" in str(figures["reason"])
        assert isinstance(figures["compared"], int)
        assert 30 <= figures["compared"] <= 30 + 50
        for _ in range(50):  # the candidate is unloaded once what it held is answered
            if index(server) == ["1"]:
                break
            time.sleep(0.1)
        assert index(server) == ["1"]
        after = load(server.url, 2, 1)
        assert versions(after) == {"1": len(after)}


def test_a_failing_candidate_is_answered_by_the_baseline_then_rolled_back(tmp_path: Path) -> None:
    root = repository(tmp_path)
    with served(root) as server:
        ready(server, 1)
        folder = root / NAME / "2"
        folder.mkdir(parents=True)
        build_model(
            folder / "model.onnx",
            labels=LABELS,
            metadata={"model_name": NAME, "model_version": "build-2"},
            stuck_iterations=10,
        )
        start(server, candidate="2", mode="canary", percent=100, min_requests=10)
        red = _red_png()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answers = [
                http.post("/predict", files={"files": ("red.png", red, "image/png")})
                for _ in range(12)
            ]
        assert [a.status_code for a in answers] == [200] * 12
        assert {a.json()["model_version"] for a in answers} == {"1"}
        figures = state(server)
        assert figures["status"] == "rolled_back"
        assert "error rate" in str(figures["reason"])


def test_rollout_requests_are_checked(tmp_path: Path) -> None:
    root = repository(tmp_path)
    with served(root) as server:
        ready(server, 1)
        add_candidates(root)
        url = server.url + ROLLOUT

        def put(body: object) -> httpx.Response:
            return httpx.put(url, json=body, timeout=60)

        assert httpx.get(url).status_code == 404
        bad = [
            {"candidate": "2", "mode": "canary"},  # no percent
            {"candidate": "2", "mode": "shadow", "percent": 5},
            {"candidate": "2", "mode": "blue-green", "percent": 5},
            {"candidate": "2", "mode": "canary", "percent": 0},
            {"candidate": "2", "mode": "canary", "percent": 10, "min_agreement": 2},
            {"candidate": "two", "mode": "shadow"},
            {"candidate": "1", "mode": "shadow"},  # the baseline itself
            {"candidate": "2", "mode": "shadow", "surprise": True},
        ]
        for body in bad:
            response = put(body)
            assert response.status_code == 400, (body, response.text)
            assert set(response.json()) == {"error"}
        assert put({"candidate": "9", "mode": "shadow"}).status_code == 404
        other = httpx.put(server.url + "/v2/repository/models/other/rollout", json=bad[1])
        assert other.status_code in (400, 404)
        assert httpx.post(url + "/promote").status_code == 409
        assert httpx.delete(url).status_code == 409

        start(server, candidate="2", mode="shadow")
        assert put({"candidate": "3", "mode": "shadow"}).status_code == 409
        load_call = httpx.post(server.url + f"/v2/repository/models/{NAME}/unload")
        assert load_call.status_code == 409
        stopped = httpx.delete(url)
        assert stopped.status_code == 200
        assert stopped.json()["status"] == "stopped"
        assert index(server) == ["1"]
        answers = load(server.url, 2, 1)
        assert versions(answers) == {"1": len(answers)}


def test_a_candidate_with_other_classes_is_refused(tmp_path: Path) -> None:
    root = repository(tmp_path)
    with served(root) as server:
        ready(server, 1)
        add_version(root, 2)  # labels "zero@v2"...: not the baseline's classes
        response = httpx.put(server.url + ROLLOUT, json={"candidate": "2", "mode": "shadow"})
        assert response.status_code == 409
        assert "other classes" in response.json()["error"]
        assert index(server) == ["1"]


def _red_png() -> bytes:
    """An image whose top-left pixel fails a model built with faults (tests.helpers.models)."""
    pixels = np.full((32, 32, 3), POISON, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_replacement_worker_applies_the_running_rollout(tmp_path: Path) -> None:
    root = repository(tmp_path)
    with served(root, 2) as server:
        pids = start_workers(server)
        add_candidates(root)  # on a plain start, the newest (3) would serve
        start(server, candidate="2", mode="shadow", compare_share=1.0)
        os.kill(pids[0], signal.SIGKILL)
        server.wait_for_log(message_is("worker exited; starting a new one"))
        server.wait_for_log(message_is("worker started"))
        answers = load(server.url, 4, 3)
        assert statuses(answers) == {200: len(answers)}
        assert versions(answers) == {"1": len(answers)}  # every worker's baseline
        assert state(server)["status"] == "running"
        assert index(server) == ["1", "2"]


def test_grpc_and_the_protocol_follow_the_canary_and_say_who_answered(tmp_path: Path) -> None:
    root = repository(tmp_path)
    port = free_port()
    with served(root, grpc_port=str(port)) as server:
        ready(server, 1)
        add_candidates(root)
        start(server, candidate="2", mode="canary", percent=100)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        images = triton.InferInput("images", [1], "BYTES")
        images.set_data_from_numpy(np.array([IMAGES[0]], dtype=object))
        result = client.infer(NAME, [images])
        assert result.get_response().model_version == "2"
        pinned = client.infer(NAME, [images], model_version="1")  # a named version is kept
        assert pinned.get_response().model_version == "1"

        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        body["inputs"][0]["data"] = [base64.b64encode(IMAGES[0]).decode()]
        response = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == response.headers["x-model-version"] == "2"
        path = f"/v2/models/{NAME}/infer"
        logged = server.wait_for_log(lambda entry: entry.get("path") == path)  # the access log
        assert logged["model_version"] == "2"
