"""The CUDA path on a real GPU: ``make gpu-check`` runs these (``-m gpu``); ``make test`` does not.

The model: the digits demo with its fp16 variant beside it, built by
``python -m model build --also fp16 --out $RESNET_GPU_TEST_MODEL`` (default artifacts/model.onnx),
and its validation scans as the images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from app.batching.batcher import bucket_for
from app.repository.configs import batch_buckets, runtime_config
from app.runtimes.onnxruntime import OnnxModel
from app.runtimes.providers import CPU, CUDA
from app.settings import Settings
from core.contract import variant_path
from tests.conftest import Serve
from tests.helpers.server import ROOT, message_is, post_image, run_server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        CUDA not in ort.get_available_providers(),
        reason=f"needs onnxruntime-gpu with the {CUDA} (have {ort.get_available_providers()})",
    ),
]

MODEL = Path(os.environ.get("RESNET_GPU_TEST_MODEL", ROOT / "artifacts" / "model.onnx"))
BUCKETS = (1, 2, 4, 8, 16, 32)


@pytest.fixture(scope="module")
def model_file() -> Path:
    fp16 = variant_path(MODEL, "fp16")
    if not (MODEL.is_file() and fp16.is_file()):
        pytest.fail(f"{MODEL} and {fp16.name}: build them with python -m model build --also fp16")
    return MODEL


def load(path: Path, **overrides: Any) -> OnnxModel:
    settings = Settings(model_path=path, max_batch_size=BUCKETS[-1], **overrides)
    model = OnnxModel.load(runtime_config(settings))
    model.bind(batch_buckets(settings, model.provider))
    return model


@pytest.fixture(scope="module")
def images(model_file: Path) -> np.ndarray:
    from model.data import digits  # sklearn's scans; model/ is importable where tests run

    recipe = load(model_file, providers="cpu").metadata.recipe
    _, val = digits(recipe=recipe)
    return val.images


def run_all(model: OnnxModel, images: np.ndarray) -> np.ndarray:
    """Every image, in bucket-sized batches padded with zeros as the batcher pads them."""
    rows = []
    for start in range(0, len(images), BUCKETS[-1]):
        chunk = images[start : start + BUCKETS[-1]]
        padded = np.zeros((bucket_for(len(chunk), BUCKETS), *chunk.shape[1:]), np.uint8)
        padded[: len(chunk)] = chunk
        rows.append(model.predict(padded)[: len(chunk)])
    return np.concatenate(rows)


def test_cuda_matches_the_cpu_within_1e_3_in_fp32(model_file: Path, images: np.ndarray) -> None:
    cuda = load(model_file, providers="cuda", model_precision="fp32")
    cpu = load(model_file, providers="cpu", model_precision="fp32")
    assert (cuda.provider, cpu.provider) == (CUDA, CPU)
    difference = np.abs(run_all(cuda, images) - run_all(cpu, images)).max()
    assert difference < 1e-3, f"max |CUDA - CPU| = {difference:.2e} over {len(images)} images"


def test_fp16_is_served_on_cuda_by_default_and_agrees_with_fp32(
    model_file: Path, images: np.ndarray
) -> None:
    fp16 = load(model_file, providers="cuda")
    fp32 = load(model_file, providers="cuda", model_precision="fp32")
    assert (fp16.metadata.precision, fp32.metadata.precision) == ("fp16", "fp32")
    agreement = (run_all(fp16, images).argmax(1) == run_all(fp32, images).argmax(1)).mean()
    assert agreement >= 0.99, f"fp16 top-1 agreement with fp32: {agreement:.2%}"


def test_cuda_graphs_give_identical_outputs_for_every_bucket(model_file: Path) -> None:
    # The heuristic search picks the same convolution algorithms in both sessions (an
    # exhaustive one may time two algorithms differently), so any difference is the graphs'.
    on = load(model_file, providers="cuda", cuda_graphs=True, cuda_conv_algo_search="heuristic")
    off = load(model_file, providers="cuda", cuda_graphs=False, cuda_conv_algo_search="heuristic")
    assert (on.cuda_graphs, off.cuda_graphs) == (True, False)
    rng = np.random.default_rng(0)
    crop = on.metadata.recipe.crop_size
    for bucket in BUCKETS:
        on.predict(np.zeros((bucket, crop, crop, 3), np.uint8))  # captures this bucket's graph
        for _ in range(2):  # replays must read the new input, not the captured one
            batch = rng.integers(0, 256, (bucket, crop, crop, 3), dtype=np.uint8)
            np.testing.assert_array_equal(on.predict(batch), off.predict(batch))


def test_padding_rows_do_not_change_the_real_rows(model_file: Path, images: np.ndarray) -> None:
    model = load(model_file, providers="cuda")
    real = images[:3]
    zeros = np.concatenate([real, np.zeros_like(images[:1])])
    noise = np.concatenate([real, np.full_like(images[:1], 255)])
    np.testing.assert_array_equal(model.predict(zeros)[:3], model.predict(noise)[:3])


@pytest.mark.anyio
async def test_one_request_of_three_images_gets_three_answers(
    model_file: Path, serve: Serve, png_digits: dict[str, bytes]
) -> None:
    names = sorted(png_digits)[:3]
    files = [("files", (name, png_digits[name], "image/png")) for name in names]
    async with serve(
        model_path=model_file, providers="cuda", max_batch_size=8, max_wait_ms=50.0
    ) as client:
        response = await client.post("/predict", files=files, params={"top_k": 1})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == names  # three answers, no padding row
    assert [r["predictions"][0]["label"] for r in results] == [_digit(n) for n in names]


def test_a_uvicorn_process_on_cuda_answers_like_the_offline_model(
    model_file: Path, png_digits: dict[str, bytes]
) -> None:
    offline = load(model_file, providers="cpu", model_precision="fp32")
    with run_server(model_file, providers="cuda", max_batch_size="8") as server:
        ready = server.wait_for_log(message_is("ready"))
        assert ready.get("provider") == CUDA, ready
        for name, data in png_digits.items():
            response = post_image(server.url, data, name)
            assert response.status_code == 200, response.text
            (result,) = response.json()["results"]
            best = result["predictions"][0]
            expected = _offline_top1(offline, data)
            assert best["class_id"] == expected[0], (name, best, expected)
            assert abs(best["score"] - expected[1]) < 1e-2  # fp16 on the GPU, fp32 offline


@pytest.fixture(scope="module")
def png_digits() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((ROOT / "examples").glob("*.png"))}


def _digit(name: str) -> str:
    return name.removeprefix("digit-").removesuffix(".png")


def _offline_top1(model: OnnxModel, data: bytes) -> tuple[int, float]:
    from core.preprocess import decode

    probabilities = model.predict(decode(data, model.metadata.recipe)[None])[0]
    best = int(np.argmax(probabilities))
    return best, float(probabilities[best])
