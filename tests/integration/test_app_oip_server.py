"""The Open Inference Protocol against a real uvicorn process, spoken by Triton's own client.

Every answer must equal what /predict answers for the same image (class ids, scores to 1e-6).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from core.contract import CLASS_IDS_NAME, CLASS_MAP_NAME, INPUT_NAME, OUTPUT_NAME
from core.preprocess import decode
from tests.helpers.models import CROP_SIZE, LABELS, image_bytes, recipe_for
from tests.helpers.server import Server, message_is, post_image, run_server
from tests.helpers.uploads import png_declaring

MODEL, VERSION = "tiny-test", "7"
K = 3
SEEDS = (0, 1, 2)


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield triton_client
    triton_client.close()


def predicted(server: Server, data: bytes) -> list[tuple[int, float]]:
    """What /predict answers for ``data``: the reference every protocol answer must equal."""
    response = post_image(server.url, data, "x.png")
    assert response.status_code == 200, response.text
    return [(p["class_id"], p["score"]) for p in response.json()["results"][0]["predictions"]]


def assert_same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert np.allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-6)


def top_of(probabilities: np.ndarray) -> list[tuple[int, float]]:
    order = np.argsort(-probabilities, kind="stable")[:K]
    return [(int(i), float(probabilities[i])) for i in order]


def parse_classes(row: np.ndarray) -> list[tuple[int, float]]:
    """Triton's "score:index:label" (tritonclient gives bytes from binary data, str from JSON)."""
    parts = [(item.decode() if isinstance(item, bytes) else item).split(":", 2) for item in row]
    assert all(label == LABELS[int(index)] for _, index, label in parts)
    return [(int(index), float(score)) for score, index, _ in parts]


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, VERSION)
    assert not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    for metadata in (client.get_model_metadata(MODEL), client.get_model_metadata(MODEL, VERSION)):
        assert metadata["name"] == MODEL
        assert metadata["versions"] == [VERSION]
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [
            {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, CROP_SIZE, CROP_SIZE, 3]}
        ]
        outputs = {output["name"]: output for output in metadata["outputs"]}
        assert list(outputs) == [OUTPUT_NAME, "logits", "embedding", "heatmap"]
        assert all(output["datatype"] == "FP32" for output in outputs.values())
        assert outputs["heatmap"]["shape"] == [-1, 4, 4]


@pytest.mark.parametrize(
    ("name", "version"), [("other", ""), (MODEL, "8")], ids=["model", "version"]
)
def test_unknown_model_or_version_is_404(
    client: triton.InferenceServerClient, name: str, version: str
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata(name, version)
    assert raised.value.status() == "404"
    assert "unknown" in raised.value.message()


def bytes_input(payloads: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(INPUT_NAME, [len(payloads)], "BYTES")
    # JSON cannot carry raw bytes: as JSON data, each image goes as base64 text.
    items = payloads if binary else [base64.b64encode(data) for data in payloads]
    tensor.set_data_from_numpy(np.array(items, dtype=object), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_infer_encoded_images_equals_predict(
    server: Server, client: triton.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    payloads = [image_bytes(seed) for seed in SEEDS]
    outputs = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=binary_out)]
    result = client.infer(MODEL, [bytes_input(payloads, binary_in)], outputs=outputs)

    probabilities = result.as_numpy(OUTPUT_NAME)
    assert probabilities.dtype == np.float32
    assert probabilities.shape[0] == len(payloads)
    for row, data in zip(probabilities, payloads, strict=True):
        assert_same(top_of(row), predicted(server, data))
    assert len({int(np.argmax(row)) for row in probabilities}) > 1


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_classification_extension_equals_predict(
    server: Server, client: triton.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    payloads = [image_bytes(seed) for seed in SEEDS]
    outputs = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=binary_out, class_count=K)]
    result = client.infer(
        MODEL, [bytes_input(payloads, binary_in)], model_version=VERSION, outputs=outputs
    )

    classes = result.as_numpy(OUTPUT_NAME)
    assert classes.shape == (len(payloads), K)
    for row, data in zip(classes, payloads, strict=True):
        assert_same(parse_classes(row), predicted(server, data))


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_embedding_and_heatmap_equal_embed_and_the_file(
    server: Server, client: triton.InferenceServerClient, model_path: Path, binary_out: bool
) -> None:
    payloads = [image_bytes(seed) for seed in SEEDS]
    outputs = [
        triton.InferRequestedOutput("embedding", binary_data=binary_out),
        triton.InferRequestedOutput("heatmap", binary_data=binary_out),
    ]
    # tritonclient sets parameters per request: the class of every image's heatmap.
    result = client.infer(
        MODEL, [bytes_input(payloads, True)], outputs=outputs, parameters={"class_id": 3}
    )

    embeddings, maps = result.as_numpy("embedding"), result.as_numpy("heatmap")
    assert (embeddings.shape, maps.shape) == ((3, 48), (3, 4, 4))
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(payloads)]
    raw = httpx.post(f"{server.url}/embed", files=files, params={"normalize": "false"})
    np.testing.assert_allclose(
        embeddings, [r["embedding"] for r in raw.json()["results"]], atol=1e-6
    )
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    crops = np.stack([decode(data, recipe_for(CROP_SIZE)) for data in payloads])
    feeds = {INPUT_NAME: crops, CLASS_IDS_NAME: np.full(len(crops), 3, dtype=np.int64)}
    (expected,) = session.run([CLASS_MAP_NAME], feeds)
    np.testing.assert_allclose(maps, expected, atol=1e-6)


def test_infer_uint8_crops_equals_predict(
    server: Server, client: triton.InferenceServerClient
) -> None:
    payloads = [image_bytes(seed) for seed in SEEDS]
    crops = np.stack([decode(data, recipe_for(CROP_SIZE)) for data in payloads])
    tensor = triton.InferInput(INPUT_NAME, list(crops.shape), "UINT8")
    tensor.set_data_from_numpy(crops)
    result = client.infer(MODEL, [tensor])  # no outputs named: all of them, in binary

    for row, data in zip(result.as_numpy(OUTPUT_NAME), payloads, strict=True):
        assert_same(top_of(row), predicted(server, data))


BAD_IMAGES = {
    "not-an-image": b"hello, world",
    "truncated": image_bytes(0)[:60],
    "too-many-pixels": png_declaring(30_000, 30_000),
}


@pytest.mark.parametrize("data", list(BAD_IMAGES.values()), ids=list(BAD_IMAGES))
def test_bad_images_get_the_status_predict_gives(
    server: Server, client: triton.InferenceServerClient, data: bytes
) -> None:
    expected = post_image(server.url, data, "x.png")
    assert expected.status_code in (413, 415, 422), expected.text
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [bytes_input([image_bytes(1), data], binary=True)])
    assert raised.value.status() == str(expected.status_code)
    assert raised.value.message().startswith("image 1: ")


def test_image_count_limit_applies_to_both_apis(model_path: Path) -> None:
    payloads = [image_bytes(seed) for seed in SEEDS]
    with run_server(model_path, max_images_per_request="2") as limited:
        limited.wait_for_log(message_is("ready"))
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(payloads)]
        predict = httpx.post(f"{limited.url}/predict", files=files, timeout=60)
        triton_client = triton.InferenceServerClient(limited.url.removeprefix("http://"))
        try:
            with pytest.raises(InferenceServerException) as raised:
                triton_client.infer(MODEL, [bytes_input(payloads, binary=True)])
            two = triton_client.infer(MODEL, [bytes_input(payloads[:2], binary=True)])
        finally:
            triton_client.close()

    assert predict.status_code == 400
    assert "max_images_per_request=2" in predict.json()["error"]["message"]
    assert raised.value.status() == "400"
    assert "max_images_per_request=2" in raised.value.message()
    assert two.as_numpy(OUTPUT_NAME).shape[0] == 2
