"""API keys on a real ``python -m app``: what is guarded, what stays open, refusals, rotation."""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.edge.access import MAX_KEY_BYTES
from tests.helpers.metrics import families
from tests.helpers.models import image_bytes
from tests.helpers.server import Server, message_is, run_server

API_KEYS = ("api-key-one-7f3a9c", "api-key-two-e41b08")
METRICS_KEY = "metrics-key-5d2c71"
ROTATION_DEADLINE_S = 15.0

Headers = dict[str, str]


def bearer(key: str) -> Headers:
    return {"Authorization": f"Bearer {key}"}


def call(server: Server, method: str, path: str, headers: Headers) -> httpx.Response:
    if method == "POST":
        files = [("files", ("x.png", image_bytes(1), "image/png"))]
        return httpx.post(f"{server.url}{path}", files=files, headers=headers, timeout=30)
    return httpx.get(f"{server.url}{path}", headers=headers, timeout=30)


# On a real server, one of each kind; tests/integration/test_app_access.py covers every declared
# route.
API_ENDPOINTS = [
    ("POST", "/predict"),
    ("GET", "/v1/model"),
    ("POST", "/v2/models/resnet50/infer"),
    ("POST", "/v2/models/resnet50/versions/1/infer"),
    ("GET", "/v2/models/resnet50"),
]
API_IDS = ["predict", "v1-model", "v2-infer", "v2-versioned-infer", "v2-metadata"]
OPEN_PATHS = ["/healthz", "/readyz", "/docs", "/openapi.json", "/v2/health/ready", "/"]
BAD_KEYS: list[Headers] = [
    {},
    {"Authorization": "Bearer"},
    {"X-API-Key": ""},
    bearer("not-a-key"),
    {"X-API-Key": API_KEYS[0][:-1]},
    bearer(API_KEYS[0] + "x"),
    bearer("k" * (MAX_KEY_BYTES + 1)),
    {"X-API-Key": API_KEYS[0] * 20},
    {"Authorization": f"Basic {API_KEYS[0]}"},
]
BAD_IDS = [
    "missing",
    "empty-bearer",
    "empty-header",
    "wrong",
    "prefix",
    "longer",
    "over-long-bearer",
    "over-long-header",
    "basic-scheme",
]


@pytest.fixture(scope="module")
def guarded(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("keys")
    api = folder / "api-keys"
    api.write_text(f"# clients\n{API_KEYS[0]}\n\n  {API_KEYS[1]}  \n", encoding="utf-8")
    scraper = folder / "metrics-keys"
    scraper.write_text(f"{METRICS_KEY}\n", encoding="utf-8")
    with run_server(
        model_path, api_keys_file=str(api), metrics_api_keys_file=str(scraper)
    ) as server:
        server.wait_for_log(message_is("ready"))
        yield server


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="resnet-serve"')
    error = response.json()["error"]
    if response.request.url.path.startswith("/v2"):
        # The Open Inference Protocol's shape: {"error": "message"}.
        assert "key" in error
        return
    assert error["code"] == "unauthorized"
    assert error["request_id"] == response.headers["X-Request-ID"]


def test_without_key_files_every_endpoint_is_open(model_path: Path) -> None:
    with run_server(model_path) as server:
        server.wait_for_log(message_is("ready"))
        assert call(server, "POST", "/predict", {}).status_code == 200
        assert call(server, "GET", "/v1/model", {}).status_code == 200
        assert call(server, "GET", "/metrics", bearer("anything")).status_code == 200
    assert not any(message_is("api keys loaded")(entry) for entry in server.seen)


@pytest.mark.parametrize("headers", BAD_KEYS, ids=BAD_IDS)
@pytest.mark.parametrize(("method", "path"), API_ENDPOINTS, ids=API_IDS)
def test_api_endpoints_refuse_a_missing_or_bad_key(
    guarded: Server, method: str, path: str, headers: Headers
) -> None:
    assert_refused(call(guarded, method, path, headers))


@pytest.mark.parametrize("headers", BAD_KEYS, ids=BAD_IDS)
def test_metrics_refuse_a_missing_or_bad_key(guarded: Server, headers: Headers) -> None:
    assert_refused(call(guarded, "GET", "/metrics", headers))


@pytest.mark.parametrize("key", API_KEYS, ids=["first", "second"])
@pytest.mark.parametrize("style", ["bearer", "lowercase-bearer", "x-api-key"])
def test_each_api_key_is_accepted_in_either_header(guarded: Server, key: str, style: str) -> None:
    headers = {
        "bearer": bearer(key),
        "lowercase-bearer": {"authorization": f"bearer {key}"},
        "x-api-key": {"X-API-Key": key},
    }[style]
    predicted = call(guarded, "POST", "/predict", headers)
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["results"][0]["filename"] == "x.png"
    assert call(guarded, "GET", "/v1/model", headers).status_code == 200
    for method, path in API_ENDPOINTS[2:]:
        # Past the guard: the route's own answer, for a model this server does not serve.
        answer = call(guarded, method, path, headers)
        assert answer.status_code == 404, path
        assert "unknown model 'resnet50'" in answer.json()["error"]


def test_the_metrics_key_set_is_separate(guarded: Server) -> None:
    assert call(guarded, "GET", "/metrics", bearer(METRICS_KEY)).status_code == 200
    assert call(guarded, "GET", "/metrics", {"X-API-Key": METRICS_KEY}).status_code == 200
    assert_refused(call(guarded, "GET", "/metrics", bearer(API_KEYS[0])))
    assert_refused(call(guarded, "POST", "/predict", bearer(METRICS_KEY)))


@pytest.mark.parametrize("path", OPEN_PATHS)
def test_health_and_docs_stay_open(guarded: Server, path: str) -> None:
    assert call(guarded, "GET", path, {}).status_code == 200


def test_a_refusal_is_answered_before_the_body_is_read(guarded: Server) -> None:
    # Ten megabytes announced, none sent: an answer can only come if nobody waits for them.
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Authorization: Bearer wrong\r\nContent-Length: {10_000_000}\r\n\r\n"
        )
        sock.sendall(head.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")


def test_refusals_are_counted_by_reason_and_neither_keys_nor_each_refusal_is_logged(
    guarded: Server,
) -> None:
    earlier = drain(guarded)
    started = time.monotonic()
    refusals = [call(guarded, "POST", "/predict", headers) for headers in BAD_KEYS * 3]
    elapsed = time.monotonic() - started
    assert {r.status_code for r in refusals} == {401}
    text = call(guarded, "GET", "/metrics", bearer(METRICS_KEY)).text
    found = families(text)
    by_reason = {
        s.labels["reason"]: s.value
        for s in found["resnet_serve_auth_refused"].samples
        if s.name.endswith("_total")
    }
    assert set(by_reason) == {"missing", "empty", "too_long", "invalid"}
    assert all(count >= 3 for count in by_reason.values()), by_reason
    statuses = {
        (s.labels["endpoint"], s.labels["status"]) for s in found["resnet_serve_requests"].samples
    }
    assert ("/predict", "401") in statuses

    lines = drain(guarded)
    logged = [e for e in lines if e.get("message") == "request" and e.get("status") == 401]
    # One sampled line per second stands for the rest.
    assert len(logged) <= elapsed + 1, logged
    everything = repr(guarded.seen + earlier + lines)
    assert not any(key in everything for key in (*API_KEYS, METRICS_KEY))


def drain(server: Server) -> list[dict[str, object]]:
    lines = []
    while True:
        try:
            lines.append(server.lines.get_nowait())
        except queue.Empty:
            return lines


def test_a_rewritten_key_file_takes_effect_without_a_restart(
    model_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    path.write_text("first-key\n", encoding="utf-8")
    with run_server(model_path, api_keys_file=str(path)) as server:
        server.wait_for_log(message_is("ready"))
        assert call(server, "GET", "/v1/model", bearer("first-key")).status_code == 200
        path.write_text("second-key-after-rotation\n", encoding="utf-8")
        # Across processes there is no event to wait on: the server looks once a second.
        deadline = time.monotonic() + ROTATION_DEADLINE_S
        while call(server, "GET", "/v1/model", bearer("second-key-after-rotation")).is_error:
            assert time.monotonic() < deadline, "the rewritten key file was never read"
        assert_refused(call(server, "GET", "/v1/model", bearer("first-key")))
        loaded = server.wait_for_log(message_is("api keys loaded"))
    assert (loaded["key_set"], loaded["keys"]) == ("api", 1)


def test_sighup_rereads_the_key_file(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("key-before\n", encoding="utf-8")
    with run_server(model_path, api_keys_file=str(path)) as server:
        server.wait_for_log(message_is("ready"))
        # Same inode, size and mtime: the change watcher cannot see it, only SIGHUP can.
        before = path.stat()
        path.write_text("key-after!\n", encoding="utf-8")  # as long as "key-before\n"
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert_refused(call(server, "GET", "/v1/model", bearer("key-after!")))
        server.process.send_signal(signal.SIGHUP)
        loaded = server.wait_for_log(message_is("api keys loaded"))
        assert call(server, "GET", "/v1/model", bearer("key-after!")).status_code == 200
        assert_refused(call(server, "GET", "/v1/model", bearer("key-before")))
        assert server.process.poll() is None
    assert (loaded["key_set"], loaded["keys"]) == ("api", 1)


def test_an_unusable_key_file_stops_the_server_at_start(model_path: Path, tmp_path: Path) -> None:
    with run_server(model_path, api_keys_file=str(tmp_path / "absent")) as server:
        assert server.process.wait(timeout=60) == 1
        line = server.wait_for_log(message_is("resnet-serve:"))
    assert "cannot read the api key file" in str(line["message"])
