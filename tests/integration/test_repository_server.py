"""The repository API on a real server, driven by Triton's own client (tritonclient.http)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.helpers.models import image_bytes
from tests.helpers.repository import NAME, PNG, add_version
from tests.helpers.server import message_is, post_image, run_server
from tests.helpers.workers import start_workers


def classify(client: triton.InferenceServerClient, version: str = "") -> tuple[str, str]:
    """(the version that answered, its top label) for one image."""
    images = triton.InferInput("images", [1], "BYTES")
    images.set_data_from_numpy(np.array([image_bytes(5)], dtype=object))
    top = triton.InferRequestedOutput("probabilities", class_count=1)
    result = client.infer(NAME, [images], model_version=version, outputs=[top])
    (row,) = result.as_numpy("probabilities")
    return result.get_response()["model_version"], row[0].decode().split(":", 2)[2]


def test_tritonclient_loads_switches_and_unloads_versions(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    add_version(repository, 1)
    with run_server(None, model_repository=str(repository)) as server:
        server.wait_for_log(message_is("serving"))
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            index = client.get_model_repository_index()
            assert index == [{"name": NAME, "version": "1", "state": "READY", "reason": ""}]
            assert classify(client)[0] == "1"

            add_version(repository, 2)
            client.load_model(NAME)  # the server's policy, latest: 2 in, then 1 out
            assert client.is_model_ready(NAME, "2")
            assert not client.is_model_ready(NAME, "1")
            assert classify(client)[0] == "2"
            assert classify(client)[1].endswith("@v2")

            back = '{"version_policy": {"specific": {"versions": [1]}}}'
            client.load_model(NAME, config=back)
            assert classify(client)[0] == "1"
            with pytest.raises(InferenceServerException, match="unknown version '2'"):
                classify(client, "2")

            client.unload_model(NAME)
            assert not client.is_model_ready(NAME)
            assert not client.is_server_ready()

            while not server.lines.empty():  # what was logged so far is not the answer
                server.seen.append(server.lines.get_nowait())
            server.process.send_signal(signal.SIGHUP)  # loads the repository again
            server.wait_for_log(lambda e: e.get("message") == "serving" and e.get("version") == "2")
            assert client.is_server_ready()
            assert classify(client)[0] == "2"
        finally:
            client.close()


def versions_answering(url: str, count: int) -> set[str]:
    """The versions that answer ``count`` requests, each on a new connection: the kernel spreads
    new connections over the workers."""
    return {post_image(url, PNG, "x.png").json()["model_version"] for _ in range(count)}


def test_with_two_workers_a_change_asked_of_one_is_applied_by_every_worker(
    tmp_path: Path,
) -> None:
    repository = tmp_path / "repository"
    add_version(repository, 1)
    add_version(repository, 2)
    settings = {"workers": "2", "decode_threads": "1", "model_repository": str(repository)}
    with run_server(None, **settings) as server:
        pids = start_workers(server)
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert versions_answering(server.url, 30) == {"2"}
            client.load_model(NAME, config='{"version_policy": {"specific": {"versions": [1]}}}')
            # Answered once both workers serve version 1 only.
            assert versions_answering(server.url, 30) == {"1"}

            # A replacement worker loads the folder (latest: 2), then the change it missed.
            os.kill(pids[0], signal.SIGKILL)
            replacement = server.wait_for_log(message_is("worker started"))
            assert versions_answering(server.url, 30) == {"1"}

            client.unload_model(NAME)
            statuses = {post_image(server.url, PNG, "x.png").status_code for _ in range(30)}
        finally:
            client.close()
    assert replacement["worker"] == 0
    assert statuses == {404}


def test_a_repository_folder_gone_for_a_while_costs_nothing_and_polling_goes_on(
    tmp_path: Path,
) -> None:
    repository = tmp_path / "repository"
    add_version(repository, 1)
    away = tmp_path / "away"
    with run_server(None, model_repository=str(repository), repository_poll_s="0.2") as server:
        server.wait_for_log(message_is("serving"))
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            repository.rename(away)  # unmounted, or deleted
            server.wait_for_log(message_is("the model source cannot be read"))
            index = client.get_model_repository_index()
            answered = classify(client)[0]
            ready = client.is_server_ready()
            with pytest.raises(InferenceServerException) as refused:
                client.load_model(NAME)
            away.rename(repository)
            add_version(repository, 2)  # the polls find it: the watch did not stop
            server.wait_for_log(lambda line: line.get("version") == "2")
            assert classify(client)[0] == "2"
        finally:
            client.close()
    assert index == [{"name": NAME, "version": "1", "state": "READY", "reason": ""}]
    assert answered == "1"
    assert ready
    assert refused.value.status() == "503"
    assert "cannot read the model repository" in str(refused.value.message())
