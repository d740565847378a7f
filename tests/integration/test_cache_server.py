"""The answer cache on a real server: a repeated image is a hit that the model never computes,
per endpoint and parameters; a new version never gets an old version's answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.metrics import scrape
from tests.helpers.models import image_bytes
from tests.helpers.redis import redis_server
from tests.helpers.repository import NAME, add_version
from tests.helpers.server import Server, message_is, run_server

A, B = image_bytes(21), image_bytes(22)


def counter(server: Server, name: str) -> float:
    family = scrape(server.url)[name]
    return float(sum(s.value for s in family.samples if s.name.endswith("_total")))


def post(server: Server, *images: bytes, path: str = "/predict", **params: str) -> httpx.Response:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{server.url}{path}", files=files, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def cached(model_path: Path) -> Iterator[Server]:
    with run_server(model_path, cache_bytes="1000000") as server:
        server.wait_for_log(message_is("ready"))
        yield server


def test_a_repeated_image_is_answered_without_the_model(cached: Server) -> None:
    first = post(cached, A)
    computed = counter(cached, "resnet_serve_images")
    again = post(cached, A)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json() == first.json()
    assert counter(cached, "resnet_serve_images") == computed  # the model never saw it again
    assert counter(cached, "resnet_serve_cache_hits") >= 1

    assert post(cached, A, top_k="2").headers["x-cache"] == "miss"  # other parameters
    assert post(cached, A, path="/embed").headers["x-cache"] == "miss"  # another endpoint
    both = post(cached, A, B)
    assert both.headers["x-cache"] == "partial"
    alone = post(cached, B)
    assert alone.headers["x-cache"] == "hit"
    assert both.json()["results"][1]["predictions"] == alone.json()["results"][0]["predictions"]


def test_a_bad_image_is_never_cached(cached: Server) -> None:
    for _ in range(2):
        files = {"files": ("x.png", A[: len(A) // 2], "image/png")}  # truncated
        response = httpx.post(f"{cached.url}/predict", files=files, timeout=30)
        assert response.status_code == 422, response.text
        assert "x-cache" not in response.headers


def test_the_budget_holds_by_dropping_the_least_recently_used(model_path: Path) -> None:
    with run_server(model_path, cache_bytes="8000") as server:  # room for a few answers
        server.wait_for_log(message_is("ready"))
        for seed in range(12):
            post(server, image_bytes(100 + seed))
        assert counter(server, "resnet_serve_cache_evictions") > 0
        held = scrape(server.url)["resnet_serve_cache_bytes"].samples[0].value
        assert 0 < held <= 8000
        assert post(server, image_bytes(111)).headers["x-cache"] == "hit"  # the newest stays
        assert post(server, image_bytes(100)).headers["x-cache"] == "miss"  # the oldest went


def test_a_new_version_never_gets_an_old_versions_answer(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    add_version(repository, 1)
    with run_server(None, model_repository=str(repository), cache_bytes="1000000") as server:
        server.wait_for_log(message_is("serving"))
        assert post(server, A).json()["results"][0]["predictions"][0]["label"].endswith("@v1")
        assert post(server, A).headers["x-cache"] == "hit"
        add_version(repository, 2)
        load = httpx.post(f"{server.url}/v2/repository/models/{NAME}/load", timeout=60)
        assert load.status_code == 200, load.text
        swapped = post(server, A)
        assert swapped.headers["x-cache"] == "miss"
        assert swapped.json()["model_version"] == "2"
        assert swapped.json()["results"][0]["predictions"][0]["label"].endswith("@v2")


def test_servers_sharing_redis_share_answers_and_go_on_without_it(
    model_path: Path, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as redis:
        settings = {"cache_bytes": "1000000", "redis_url": redis.url}
        with run_server(model_path, **settings) as one, run_server(model_path, **settings) as two:
            one.wait_for_log(message_is("ready"))
            two.wait_for_log(message_is("ready"))
            first = {path: post(one, A, path=path) for path in ("/predict", "/embed", "/explain")}
            computed = counter(two, "resnet_serve_images")
            # The writes are in the background: the other server finds them once they land.
            shared = {path: _hit(two, path) for path in first}
            unseen = counter(two, "resnet_serve_images") == computed
            shared_hits = counter(two, "resnet_serve_cache_shared_hits")
            redis.stop()
            alone = [post(server, B).headers["x-cache"] for server in (one, two, one)]
    for path, response in first.items():
        assert shared[path].json() == response.json(), path
    assert unseen  # the second server's model never saw the image
    assert shared_hits == 3
    assert alone == ["miss", "miss", "hit"]  # each on its own cache, no request failed


def _hit(server: Server, path: str) -> httpx.Response:
    for _ in range(50):
        response = post(server, A, path=path)
        if response.headers["x-cache"] == "hit":
            return response
        time.sleep(0.1)
    raise AssertionError(f"{path} never answered from the shared cache")
