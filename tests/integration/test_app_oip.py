"""The Open Inference Protocol's wire format and errors, in process (tritonclient: *_server)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from app.settings import Settings
from tests.conftest import Serve, running
from tests.helpers.metrics import families
from tests.helpers.models import CROP_SIZE, image_bytes

pytestmark = pytest.mark.anyio

INFER = "/v2/models/tiny-test/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def bytes_request(*payloads: bytes, **extra: Any) -> tuple[bytes, dict[str, str]]:
    """A binary BYTES request as tritonclient builds it: JSON header, then prefixed elements."""
    blob = b"".join(struct.pack("<I", len(data)) + data for data in payloads)
    tensor = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [len(payloads)],
        "parameters": {"binary_data_size": len(blob)},
    }
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + blob, {HEADER_LENGTH: str(len(header))}


def classify(k: int) -> list[dict[str, Any]]:
    return [{"name": "probabilities", "parameters": {"classification": k}}]


def json_input(**tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", **tensor}]}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


async def test_json_in_json_out_shape(serve: Serve) -> None:
    crop = np.random.default_rng(0).integers(0, 256, (1, CROP_SIZE, CROP_SIZE, 3))
    request = json_input(datatype="UINT8", shape=list(crop.shape), data=crop.ravel().tolist())
    async with serve() as client:
        response = await client.post(INFER, json={"id": "r1", **request})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert HEADER_LENGTH.lower() not in response.headers
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("tiny-test", "7", "r1")
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [1, 10],
    )
    assert np.isclose(sum(output["data"]), 1.0, atol=1e-5)


async def test_binary_out_layout_and_base64_json_in_agree(serve: Serve) -> None:
    data = image_bytes(3)
    body, headers = bytes_request(data, parameters={"binary_data_output": True})
    as_json = json_input(datatype="BYTES", shape=[1], data=[base64.b64encode(data).decode()])
    async with serve() as client:
        binary = await client.post(INFER, content=body, headers=headers)
        plain = await client.post(INFER, json=as_json)
    assert binary.status_code == 200, binary.text
    assert binary.headers["content-type"] == "application/octet-stream"
    size = int(binary.headers[HEADER_LENGTH])
    (output,) = json.loads(binary.content[:size])["outputs"]
    assert output["parameters"] == {"binary_data_size": 40}
    values = np.frombuffer(binary.content[size:], dtype="<f4")
    assert np.array_equal(values, np.float32(plain.json()["outputs"][0]["data"]))


async def test_classification_as_json(serve: Serve) -> None:
    body, headers = bytes_request(image_bytes(5), outputs=classify(2))
    async with serve() as client:
        response = await client.post(INFER, content=body, headers=headers)
        predict = await client.post(
            "/predict", files=[("f", ("x.png", image_bytes(5), "image/png"))], params={"top_k": 2}
        )
    (output,) = response.json()["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [1, 2])
    expected = predict.json()["results"][0]["predictions"]
    assert output["data"] == [f"{p['score']:f}:{p['class_id']}:{p['label']}" for p in expected]


def with_binary(request: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(request).encode()
    return header + blob, {HEADER_LENGTH: str(len(header))}


def as_json(request: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return json.dumps(request).encode(), {}


FULL_CROP = [1, CROP_SIZE, CROP_SIZE, 3]
URLS, BASE64 = {"content_type": "url"}, {"content_type": "base64"}
PREFIXED = json_input(datatype="BYTES", shape=[1], parameters={"binary_data_size": 6})
BAD_REQUESTS: dict[str, tuple[tuple[bytes, dict[str, str]], int, str]] = {
    "empty": ((b"", {}), 400, "empty"),
    "not-json": ((b"{nope", {}), 400, "invalid inference request"),
    "no-inputs": (as_json({"inputs": []}), 400, "inputs"),
    "header-length-past-body": ((b"{}", {HEADER_LENGTH: "99"}), 400, HEADER_LENGTH),
    "unclaimed-binary": (
        with_binary(json_input(datatype="BYTES", shape=[1]), b"extra"),
        400,
        "belong to no input",
    ),
    "wrong-name": (
        as_json({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": []}]}),
        400,
        "unknown input 'x'",
    ),
    "wrong-datatype": (
        as_json(json_input(datatype="FP32", shape=[1], data=[1.0])),
        400,
        "'FP32' is not one of",
    ),
    "count-mismatch": (
        as_json(json_input(datatype="BYTES", shape=[2], data=["aGk="])),
        400,
        "shape [2] but 1 elements",
    ),
    "not-base64": (
        as_json(json_input(datatype="BYTES", shape=[1], data=["%%%"])),
        400,
        "not a base64 string",
    ),
    "uint8-shape": (
        as_json(json_input(datatype="UINT8", shape=[1, 3, 3, 3], data=[0] * 27)),
        400,
        f"[N, {CROP_SIZE}, {CROP_SIZE}, 3]",
    ),
    "uint8-range": (
        as_json(
            json_input(datatype="UINT8", shape=FULL_CROP, data=[256] * int(np.prod(FULL_CROP)))
        ),
        400,
        "0..255",
    ),
    "unknown-content-type": (
        as_json(json_input(datatype="BYTES", shape=[1], data=["aGk="], parameters=BASE64)),
        400,
        "content_type='base64' is not 'url'",
    ),
    "url-in-uint8": (
        as_json(json_input(datatype="UINT8", shape=FULL_CROP, data=[0], parameters=URLS)),
        400,
        "content_type 'url' takes BYTES [N], got UINT8",
    ),
    "url-not-a-string": (
        as_json(json_input(datatype="BYTES", shape=[1], data=[7], parameters=URLS)),
        400,
        "element 0 is not a URL",
    ),
    "bad-prefix": (with_binary(PREFIXED, struct.pack("<I", 9) + b"ab"), 400, "declares 9 bytes"),
    "unknown-output": (
        bytes_request(image_bytes(0), outputs=[{"name": "features"}]),
        400,
        "unknown output 'features'",
    ),
    "classification-range": (
        bytes_request(image_bytes(0), outputs=classify(11)),
        422,
        "classification=11 is out of range 0..10",
    ),
}


@pytest.mark.parametrize(
    ("request_", "status", "fragment"), BAD_REQUESTS.values(), ids=list(BAD_REQUESTS)
)
async def test_bad_requests_get_protocol_errors(
    serve: Serve, request_: tuple[bytes, dict[str, str]], status: int, fragment: str
) -> None:
    body, headers = request_
    async with serve() as client:
        response = await client.post(INFER, content=body, headers=headers)
    assert_error(response, status, fragment)
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("POST", "/v2/models/other/infer", 404, "unknown model 'other'"),
        ("POST", "/v2/models/tiny-test/versions/8/infer", 404, "unknown version '8'"),
        ("GET", "/v2/models/other/ready", 404, "unknown model"),
        ("GET", "/v2/models/tiny-test/versions/8", 404, "unknown version"),
        ("GET", "/v2/nothing", 404, "no such path"),
        ("DELETE", "/v2/models/tiny-test", 405, "not allowed"),
    ],
    ids=["infer-model", "infer-version", "ready", "metadata", "path", "method"],
)
async def test_unknown_models_and_paths(
    serve: Serve, method: str, path: str, status: int, fragment: str
) -> None:
    async with serve() as client:
        response = await client.request(method, path, content=bytes_request(image_bytes(0))[0])
    assert_error(response, status, fragment)


async def test_limits_per_element_and_per_request(serve: Serve) -> None:
    big = image_bytes(0, size=(200, 200))
    async with serve(max_image_bytes=len(big) - 1, max_request_bytes=3 * len(big)) as client:
        body, headers = bytes_request(image_bytes(1), big)
        per_image = await client.post(INFER, content=body, headers=headers)
        body, headers = bytes_request(big, big, big, big)
        per_request = await client.post(INFER, content=body, headers=headers)
    assert_error(per_image, 413, "element 1", f"max_image_bytes={len(big) - 1}")
    assert_error(per_request, 413, "max_request_bytes")


async def test_draining_refuses_at_the_door_with_retry_after(
    make_settings: Callable[..., Settings],
) -> None:
    async with running(make_settings) as (app, client):
        assert (await client.get("/v2/health/ready")).status_code == 200
        app.state.service.lifecycle.draining = True
        ready = await client.get("/v2/health/ready")
        model_ready = await client.get("/v2/models/tiny-test/ready")
        body, headers = bytes_request(image_bytes(0))
        infer = await client.post(INFER, content=body, headers=headers)
        live = await client.get("/v2/health/live")
    for response in (ready, model_ready, infer):
        assert_error(response, 503, "shutting down")
        assert response.headers["retry-after"] == "1"
    assert live.status_code == 200


async def test_past_the_deadline_is_504(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings, request_timeout_ms=1e-6) as (app, client):
        app.state.service.models.resolve().estimate.seconds_per_image = (
            0.0  # admitted: the deadline is what fails it
        )
        body, headers = bytes_request(image_bytes(0))
        response = await client.post(INFER, content=body, headers=headers)
    assert_error(response, 504, "request_timeout_ms")


async def test_metrics_label_by_route_template(serve: Serve) -> None:
    body, headers = bytes_request(image_bytes(0))
    async with serve() as client:
        await client.post(INFER, content=body, headers=headers)
        await client.post("/v2/models/tiny-test/versions/7/infer", content=body, headers=headers)
        await client.post("/v2/models/other/infer", content=body, headers=headers)
        text = (await client.get("/metrics")).text
    counts = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in families(text)["resnet_serve_requests"].samples
        if s.name.endswith("_total")
    }
    assert counts[("/v2/models/{model_name}/infer", "200")] == 1
    assert counts[("/v2/models/{model_name}/infer", "404")] == 1
    assert counts[("/v2/models/{model_name}/versions/{model_version}/infer", "200")] == 1
