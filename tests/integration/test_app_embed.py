"""``/embed``, ``/explain`` and the protocol's ``embedding``, ``heatmap`` and ``logits`` outputs on
the tiny model (its embedding is its 48 colour-grid features, its map 4x4), checked against ONNX
Runtime run offline on the same file."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.settings import Settings
from core.contract import CLASS_IDS_NAME, CLASS_MAP_NAME, EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME
from core.preprocess import crop_box, decode
from tests.conftest import Serve, running
from tests.helpers.metrics import families
from tests.helpers.models import CROP_SIZE, LABELS, build_model, image_bytes, recipe_for

pytestmark = pytest.mark.anyio

INFER = "/v2/models/tiny-test/infer"


def files(*payloads: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(payloads)]


def offline(model_path: Path, data: bytes, class_id: int = -1) -> dict[str, np.ndarray]:
    """The file's outputs for one encoded image, computed here."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    crop = decode(data, recipe_for(CROP_SIZE))[None]
    names = ["probabilities", LOGITS_NAME, EMBEDDING_NAME, CLASS_MAP_NAME]
    feeds = {INPUT_NAME: crop, CLASS_IDS_NAME: np.array([class_id], dtype=np.int64)}
    return {name: row[0] for name, row in zip(names, session.run(names, feeds), strict=True)}


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


async def test_embed_answers_each_image_normalised_or_raw(serve: Serve, model_path: Path) -> None:
    payloads = [image_bytes(seed) for seed in range(3)]
    async with serve() as client:
        normalised = await client.post("/embed", files=files(*payloads))
        raw = await client.post("/embed", files=files(*payloads), params={"normalize": "false"})
        one = await client.post(
            "/embed", content=payloads[0], headers={"content-type": "image/png"}
        )
    assert normalised.status_code == raw.status_code == one.status_code == 200, normalised.text
    body = normalised.json()
    assert (body["model_name"], body["model_version"]) == ("tiny-test", "7")
    assert [r["filename"] for r in body["results"]] == ["img0.png", "img1.png", "img2.png"]
    for result, unscaled, data in zip(
        body["results"], raw.json()["results"], payloads, strict=True
    ):
        expected = offline(model_path, data)[EMBEDDING_NAME]
        np.testing.assert_allclose(unscaled["embedding"], expected, atol=1e-5)
        vector = np.asarray(result["embedding"])
        assert vector.shape == (48,)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)
    assert one.json()["results"][0]["filename"] is None


async def test_explain_answers_top_k_and_a_heatmap_over_the_image(
    serve: Serve, model_path: Path
) -> None:
    data = image_bytes(3, size=(80, 40))  # wider than tall: the crop is its middle
    async with serve() as client:
        response = await client.post("/explain", files=files(data), params={"top_k": 2})
        chosen = await client.post("/explain", files=files(data), params={"class_id": 4})
        predicted = await client.post("/predict", files=files(data), params={"top_k": 2})
    assert response.status_code == chosen.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["predictions"] == predicted.json()["results"][0]["predictions"]
    top = result["predictions"][0]["class_id"]
    heatmap = result["heatmap"]
    assert (heatmap["class_id"], heatmap["label"]) == (top, LABELS[top])
    assert (heatmap["width"], heatmap["height"]) == (80, 40)
    png = Image.open(io.BytesIO(base64.b64decode(heatmap["png"])))
    assert (png.size, png.format) == ((80, 40), "PNG")
    alpha = np.asarray(png.convert("RGBA"))[..., 3]
    left, top, right, bottom = (round(v) for v in crop_box(80, 40, recipe_for(CROP_SIZE)))
    # Drawn over the crop the model saw, transparent around it.
    inside = alpha[top:bottom, left:right]
    assert inside.all()
    assert alpha.sum() == inside.sum()
    # The most opaque cell is where the file's own map peaks.
    expected = offline(model_path, data)[CLASS_MAP_NAME]
    cells = inside.reshape(4, (bottom - top) // 4, 4, (right - left) // 4).mean(axis=(1, 3))
    assert np.argmax(cells) == np.argmax(expected)
    assert chosen.json()["results"][0]["heatmap"]["class_id"] == 4


async def test_protocol_outputs_embedding_heatmap_and_logits(
    serve: Serve, model_path: Path
) -> None:
    data = image_bytes(5)
    request = {
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(data).decode()],
            }
        ],
        "outputs": [
            {"name": "probabilities"},
            {"name": "embedding"},
            {"name": "heatmap", "parameters": {"class_id": 2}},
            {"name": "logits"},
        ],
    }
    async with serve() as client:
        response = await client.post(INFER, json=request)
        metadata = await client.get("/v2/models/tiny-test")
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    expected = offline(model_path, data, class_id=2)
    assert outputs["embedding"]["shape"] == [1, 48]
    np.testing.assert_allclose(outputs["embedding"]["data"], expected[EMBEDDING_NAME], atol=1e-5)
    assert outputs["heatmap"]["shape"] == [1, 4, 4]
    np.testing.assert_allclose(
        outputs["heatmap"]["data"], expected[CLASS_MAP_NAME].ravel(), atol=1e-5
    )
    np.testing.assert_allclose(outputs["logits"]["data"], expected[LOGITS_NAME], atol=1e-5)
    listed = {o["name"]: o["shape"] for o in metadata.json()["outputs"]}
    assert listed == {
        "probabilities": [-1, 10],
        "logits": [-1, 10],
        "embedding": [-1, 48],
        "heatmap": [-1, 4, 4],
    }


async def test_bad_requests_for_the_new_outputs(serve: Serve) -> None:
    data = image_bytes(1)
    crop = np.zeros((1, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(crop.shape)}
    heatmap = {
        "inputs": [tensor | {"data": crop.ravel().tolist()}],
        "outputs": [{"name": "heatmap", "parameters": {"class_id": 10}}],
    }
    async with serve() as client:
        out_of_range = await client.post("/explain", files=files(data), params={"class_id": 10})
        negative = await client.post("/explain", files=files(data), params={"class_id": -1})
        protocol = await client.post(INFER, json=heatmap)
        unknown = await client.post(INFER, json={**heatmap, "outputs": [{"name": "features"}]})
        misplaced = await client.post(
            INFER,
            json={**heatmap, "outputs": [{"name": "embedding", "parameters": {"class_id": 1}}]},
        )
    assert_error(out_of_range, 422, "invalid_parameter", "class_id=10", "0..9")
    assert negative.status_code == 422
    assert protocol.status_code == 422
    assert "class_id=10" in protocol.json()["error"]
    assert unknown.status_code == 400
    assert "'features'" in unknown.json()["error"]
    assert misplaced.status_code == 422
    assert "'heatmap' only" in misplaced.json()["error"]


async def test_a_file_exported_before_the_outputs_serves_and_names_what_it_lacks(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    old = build_model(tmp_path / "old.onnx", extras=False)
    data = image_bytes(2)
    async with running(make_settings, model_path=old) as (_, client):
        predicted = await client.post("/predict", files=files(data))
        embedded = await client.post("/embed", files=files(data))
        explained = await client.post("/explain", files=files(data))
        protocol = await client.post(
            INFER,
            content=json.dumps(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": [base64.b64encode(data).decode()],
                        }
                    ],
                    "outputs": [{"name": "embedding"}],
                }
            ),
        )
        metadata = await client.get("/v2/models/tiny-test")
    assert predicted.status_code == 200
    assert_error(embedded, 400, "output_unavailable", "'embedding'", "re-export")
    assert_error(explained, 400, "output_unavailable", "'class_map'")
    assert protocol.status_code == 400
    assert "'embedding'" in protocol.json()["error"]
    assert [o["name"] for o in metadata.json()["outputs"]] == ["probabilities", "logits"]


async def test_metrics_count_each_endpoint(serve: Serve) -> None:
    data = image_bytes(4)
    async with serve() as client:
        for path in ("/predict", "/embed", "/explain"):
            assert (await client.post(path, files=files(data))).status_code == 200
        text = (await client.get("/metrics")).text
    family = families(text)["resnet_serve_requests"]
    requests = {
        sample.labels["endpoint"]: sample.value
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert requests["/embed"] == requests["/explain"] == requests["/predict"] == 1
