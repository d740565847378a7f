"""The model repository: versions found, loaded beside the serving ones, swapped and unloaded
while clients keep sending, and a broken version never served (app.repository.models)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.reference import PROBE
from tests.conftest import running
from tests.helpers.models import build_model
from tests.helpers.repository import NAME, PNG, add_version

pytestmark = pytest.mark.anyio
OTHER = "letters"  # a second model, after NAME in name order (the order models load in)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    add_version(root, 1)
    return root


async def predict(client: httpx.AsyncClient, **params: str) -> httpx.Response:
    return await client.post("/predict", files={"f": ("x.png", PNG)}, params=params)


def infer_body() -> dict[str, Any]:
    data = base64.b64encode(PNG).decode()
    return {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [data]}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }


async def control(client: httpx.AsyncClient, action: str, **config: Any) -> httpx.Response:
    body = {"parameters": {"config": json.dumps(config)}} if config else {}
    return await client.post(f"/v2/repository/models/{NAME}/{action}", json=body)


async def test_serves_the_newest_complete_version_and_ignores_one_being_written(
    make_settings: Any, repository: Path
) -> None:
    add_version(repository, 2)
    partial = repository / NAME / "3.partial"
    shutil.copytree(repository / NAME / "2", partial)  # written beside, not renamed in yet
    async with running(make_settings, model_repository=repository) as (_, client):
        newest = await predict(client)
        first = await predict(client, version="1")
        listed = (await client.get("/v1/models")).json()
        index = (await client.post("/v2/repository/index", json={})).json()
    assert newest.json()["model_version"] == "2"  # policy latest: only the newest is loaded
    assert newest.json()["results"][0]["predictions"][0]["label"].endswith("@v2")
    assert first.status_code == 404
    assert "ready versions are ['2']" in first.json()["error"]["message"]
    assert listed["default_model"] == NAME
    assert [(m["name"], m["version"], m["build"]) for m in listed["models"]] == [
        (NAME, "2", "build-2")
    ]
    assert index == [{"name": NAME, "version": "2", "state": "READY", "reason": ""}]


async def test_load_switch_unload_go_back_and_a_broken_version_without_one_failed_request(
    make_settings: Any, repository: Path
) -> None:
    answers: Counter[tuple[int, str]] = Counter()
    stop = asyncio.Event()

    async def rest_client(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            response = await predict(client)
            version = response.json().get("model_version", "") if response.is_success else ""
            label = response.json()["results"][0]["predictions"][0]["label"] if version else ""
            assert label.endswith(f"@v{version}") or not version  # labelled by who computed it
            answers[(response.status_code, version)] += 1

    async def protocol_client(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            response = await client.post(f"/v2/models/{NAME}/infer", json=infer_body())
            answers[(response.status_code, response.json().get("model_version", ""))] += 1

    async with running(make_settings, model_repository=repository) as (app, client):
        clients = [asyncio.create_task(rest_client(client)) for _ in range(16)]
        clients += [asyncio.create_task(protocol_client(client)) for _ in range(4)]
        add_version(repository, 2)
        both = await control(client, "load", version_policy={"latest": {"num_versions": 2}})
        # v2 beside v1, and it takes over
        assert app.state.service.models.versions(NAME) == ["1", "2"]
        only_two = await control(client, "load")  # the server's policy: latest
        assert app.state.service.models.versions(NAME) == ["2"]
        back = await control(client, "load", version_policy={"specific": {"versions": [1]}})
        assert app.state.service.models.versions(NAME) == ["1"]
        broken = repository / NAME / "3"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(
            (repository / NAME / "2" / "model.onnx").read_bytes()[:500]
        )
        failed = await control(client, "load")  # latest is 3, which cannot load
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
        index = (await client.post("/v2/repository/index", json={})).json()
    assert [r.status_code for r in (both, only_two, back)] == [200, 200, 200]
    assert failed.status_code == 400
    assert "version 3" in failed.json()["error"]
    assert "serving ['1']" in failed.json()["error"]
    assert {status for status, _ in answers} == {200}, answers
    assert {version for _, version in answers} == {"1", "2"}
    assert {"name": NAME, "version": "1", "state": "READY", "reason": ""} in index
    (three,) = [entry for entry in index if entry["version"] == "3"]
    assert three["state"] == "UNAVAILABLE"
    assert "cannot load ONNX model" in three["reason"]


async def test_unload_finishes_admitted_work_then_the_model_is_gone(
    make_settings: Any, repository: Path
) -> None:
    async with running(make_settings, model_repository=repository) as (app, client):
        served = app.state.service.models.resolve()
        pending = [asyncio.create_task(predict(client)) for _ in range(6)]
        await asyncio.sleep(0)
        unloaded = await control(client, "unload")
        answered = await asyncio.gather(*pending)
        after = await predict(client)
        ready = await client.get("/readyz")
        reloaded = await control(client, "load")
        again = await predict(client)
    assert unloaded.status_code == 200
    assert {r.status_code for r in answered} <= {200, 404}  # admitted ones answered, never 5xx
    assert served.state == "UNAVAILABLE"
    assert after.status_code == 404
    assert ready.status_code == 503
    assert (reloaded.status_code, again.status_code) == (200, 200)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/repository/models/..%2Fetc/load", {}, 404, ""),
        ("/v2/repository/models/a..b/load", {}, 400, "no '..'"),
        ("/v2/repository/models/nope/load", {}, 404, "no model 'nope'"),
        ("/v2/repository/models/nope/unload", {}, 404, "not loaded"),
        (
            f"/v2/repository/models/{NAME}/load",
            {
                "parameters": {
                    "config": json.dumps({"version_policy": {"specific": {"versions": [0]}}})
                }
            },
            400,
            "positive integer",
        ),
        (
            f"/v2/repository/models/{NAME}/load",
            {"parameters": {"config": "{"}},
            400,
            "version_policy",
        ),
        ("/v2/repository/index", {"ready": "maybe"}, 400, "invalid request"),
    ],
    ids=["slash", "dots", "unknown", "unknown-unload", "version-zero", "bad-config", "bad-index"],
)
async def test_bad_repository_requests_are_clear_4xx(
    make_settings: Any, repository: Path, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    async with running(make_settings, model_repository=repository) as (_, client):
        response = await client.post(path, json=body)
        still = await predict(client)
    assert response.status_code == status, response.text
    assert message in response.text
    assert still.status_code == 200


async def test_a_folder_whose_model_has_another_name_never_serves(
    make_settings: Any, repository: Path
) -> None:
    async with running(make_settings, model_repository=repository) as (_, client):
        add_version(repository, 2, name="something-else")
        loaded = await control(client, "load")
        index = (await client.post("/v2/repository/index", json={})).json()
        answer = await predict(client)
    assert loaded.status_code == 400
    (two,) = [entry for entry in index if entry["version"] == "2"]
    assert "holds the model 'something-else'" in two["reason"]
    assert answer.json()["model_version"] == "1"  # version 2 failed: version 1 still serves


def wrong_input_shape(folder: Path) -> None:
    # A 24x24 graph whose metadata promises 16x16 crops.
    preprocessing = {"resize_size": 20, "crop_size": 16, "interpolation": "bilinear"}
    preprocessing |= {"mean": [0.5] * 3, "std": [0.5] * 3}
    metadata = {"model_name": NAME, "preprocessing": json.dumps(preprocessing)}
    build_model(folder / "model.onnx", crop_size=24, metadata=metadata)


def labels_missing(folder: Path) -> None:
    build_model(folder / "model.onnx", metadata={"model_name": NAME}, drop=("labels",))


def not_what_was_exported(folder: Path) -> None:
    # Its reference says the probes are class 0 at 0.99: these weights compute something else.
    probes = [[[0, 0.99]], [[0, 0.99]]]
    entry = json.dumps({"probe": PROBE, "top": probes})
    build_model(folder / "model.onnx", metadata={"model_name": NAME, "reference": entry})


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (wrong_input_shape, "24"),
        (labels_missing, "missing ['labels']"),
        (not_what_was_exported, "does not compute what was exported"),
    ],
    ids=["input-shape", "labels-missing", "reference"],
)
async def test_a_broken_version_is_refused_with_its_reason_and_never_serves(
    make_settings: Any, repository: Path, write: Callable[[Path], None], reason: str
) -> None:
    async with running(make_settings, model_repository=repository) as (_, client):
        (repository / NAME / "2").mkdir()
        write(repository / NAME / "2")
        refused = await control(client, "load")
        index = (await client.post("/v2/repository/index", json={})).json()
        answer = await predict(client)
    assert refused.status_code == 400
    (two,) = [entry for entry in index if entry["version"] == "2"]
    assert two["state"] == "UNAVAILABLE"
    assert reason in two["reason"], two["reason"]
    assert answer.json()["model_version"] == "1"


async def test_watching_loads_a_version_once_its_files_have_settled(
    make_settings: Any, repository: Path
) -> None:
    async with running(make_settings, model_repository=repository, repository_poll_s=0.05) as (
        app,
        client,
    ):
        add_version(repository, 2)
        for _ in range(400):  # each look is an event on the loop; at most 20 s
            if app.state.service.models.versions(NAME) == ["2"]:
                break
            await asyncio.sleep(0.05)
        answer = await predict(client)
        shutil.rmtree(repository / NAME)
        for _ in range(400):
            if not app.state.service.models.ready():
                break
            await asyncio.sleep(0.05)
        gone = await predict(client)
    assert answer.json()["model_version"] == "2"
    assert gone.status_code == 404  # its folder went: so did the model


async def test_the_repository_api_has_its_own_keys(
    make_settings: Any, repository: Path, tmp_path: Path
) -> None:
    (tmp_path / "api").write_text("inference-key\n")
    (tmp_path / "repo").write_text("repository-key\n")
    inference = {"Authorization": "Bearer inference-key"}
    repo = {"Authorization": "Bearer repository-key"}
    async with running(
        make_settings, model_repository=repository, api_keys_file=tmp_path / "api"
    ) as (_, client):
        no_key_set = await client.post("/v2/repository/index", json={}, headers=inference)
    async with running(
        make_settings,
        model_repository=repository,
        api_keys_file=tmp_path / "api",
        repository_api_keys_file=tmp_path / "repo",
    ) as (_, client):
        wrong = await client.post(f"/v2/repository/models/{NAME}/unload", headers=inference)
        right = await client.post("/v2/repository/index", json={}, headers=repo)
        repo_predicts = await client.post("/predict", files={"f": PNG}, headers=repo)
    assert no_key_set.status_code == 403
    assert "RESNET_SERVE_REPOSITORY_API_KEYS_FILE" in no_key_set.text
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert repo_predicts.status_code == 401  # and a repository key cannot run inference


async def test_a_load_over_the_memory_budget_is_refused_and_the_serving_version_goes_on(
    make_settings: Any, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(make_settings, model_repository=repository, memory_budget_mib=64 * 1024) as (
        _,
        client,
    ):
        add_version(repository, 2)
        # As if version 2's sessions needed far more than the budget leaves.
        monkeypatch.setattr("app.process.memory.SESSION_BYTES_PER_FILE_BYTE", 1e9)
        refused = await control(client, "load")
        answer = await predict(client)
    assert refused.status_code == 400
    assert "over memory_budget_mib=65536" in refused.json()["error"]
    assert answer.json()["model_version"] == "1"


async def test_a_loads_own_policy_holds_across_reloads_until_a_load_without_one(
    make_settings: Any, repository: Path
) -> None:
    add_version(repository, 2)
    async with running(make_settings, model_repository=repository) as (app, client):
        models = app.state.service.models
        await control(client, "load", version_policy={"specific": {"versions": [1]}})
        await models.load_all()  # what SIGHUP does
        await models.load_all(polled=True)  # and what a watcher's look does
        kept = models.versions(NAME)
        await control(client, "load")  # no policy: back to the server's, latest
        back = models.versions(NAME)
    assert kept == ["1"]
    assert back == ["2"]


async def test_with_latest_2_going_back_is_a_swap_to_the_warm_version_opening_nothing(
    make_settings: Any, repository: Path
) -> None:
    add_version(repository, 2)
    async with running(make_settings, model_repository=repository, version_policy="latest:2") as (
        app,
        client,
    ):
        models = app.state.service.models
        previous = models.resolve(NAME, "1")
        newest = await predict(client)
        back = await control(client, "load", version_policy={"specific": {"versions": [1]}})
        after = await predict(client)
        kept = models.resolve(NAME, "1")
    assert newest.json()["model_version"] == "2"
    assert back.status_code == 200
    assert after.json()["model_version"] == "1"
    assert kept is previous  # the version loaded at start-up: nothing was opened


async def test_with_several_models_and_no_default_a_request_must_name_one(
    make_settings: Any, repository: Path
) -> None:
    add_version(repository, 1, model=OTHER)
    async with running(make_settings, model_repository=repository) as (_, client):
        unnamed = await predict(client)
        named = await predict(client, model=OTHER)
        described = await client.get("/v1/model")
        listed = (await client.get("/v1/models")).json()
        ready = [(await client.get(path)).status_code for path in ("/readyz", "/v2/health/ready")]
    assert unnamed.status_code == 400
    error = unnamed.json()["error"]
    assert error["code"] == "model_required"
    assert f"['{NAME}', '{OTHER}']" in error["message"]
    assert "RESNET_SERVE_DEFAULT_MODEL" in error["message"]
    assert named.json()["model_name"] == OTHER
    assert described.json()["error"]["code"] == "model_required"
    assert listed["default_model"] is None
    assert [m["name"] for m in listed["models"]] == [NAME, OTHER]
    assert ready == [200, 200]


async def test_the_default_model_setting_takes_the_requests_naming_none_and_readiness(
    make_settings: Any, repository: Path
) -> None:
    add_version(repository, 1, model=OTHER)
    async with running(make_settings, model_repository=repository, default_model=OTHER) as (
        _,
        client,
    ):
        unnamed = await predict(client)
        described = (await client.get("/v1/model")).json()
        listed = (await client.get("/v1/models")).json()
        ready = await client.get("/readyz")
        await client.post(f"/v2/repository/models/{OTHER}/unload")
        without_it = await client.get("/readyz")  # NAME still serves, but not the default
        refused = await predict(client)
    assert unnamed.json()["model_name"] == OTHER
    assert described["name"] == OTHER
    assert listed["default_model"] == OTHER
    assert ready.status_code == 200
    assert without_it.status_code == 503
    assert f"unknown model '{OTHER}'" in without_it.json()["error"]["message"]
    assert refused.status_code == 404


async def test_a_model_whose_every_version_failed_still_counts_until_it_is_unloaded(
    make_settings: Any, repository: Path
) -> None:
    (repository / OTHER / "1").mkdir(parents=True)
    (repository / OTHER / "1" / "model.onnx").write_bytes(b"not an onnx file")
    async with running(make_settings, model_repository=repository) as (_, client):
        ambiguous = await predict(client)
        unloaded = await client.post(f"/v2/repository/models/{OTHER}/unload")
        unnamed = await predict(client)
        listed = (await client.get("/v1/models")).json()
    assert ambiguous.json()["error"]["code"] == "model_required"
    assert unloaded.status_code == 200
    assert unnamed.json()["model_name"] == NAME  # the only model now: the default
    assert listed["default_model"] == NAME
