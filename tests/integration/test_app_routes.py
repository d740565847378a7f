from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from app.edge.requests import unless_disconnected
from app.errors import ClientClosedRequest
from app.http.schemas import PredictResponse
from app.main import create_app
from app.repository.configs import runtime_config
from app.runtimes.base import Outputs
from app.runtimes.onnxruntime import OnnxModel
from core.contract import CLASSIFY
from core.preprocess import Recipe
from tests.conftest import Serve
from tests.helpers.metrics import families
from tests.helpers.models import CROP_SIZE, LABELS, image_bytes, offline_top
from tests.helpers.uploads import join_parts

pytestmark = pytest.mark.anyio
# The labels of the tiny model's per-version metrics (its metadata's name and version).
TINY = {"model": "tiny-test", "version": "7"}

RECIPE = Recipe(resize_size=CROP_SIZE + CROP_SIZE // 4, crop_size=CROP_SIZE)


def files(*payloads: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(payloads)]


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    for fragment in fragments:
        assert fragment in error["message"]


async def test_predict_multipart_many_images_in_order_matching_offline(
    serve: Serve, model_path: Path
) -> None:
    payloads = [image_bytes(seed) for seed in range(6)]
    async with serve() as client:
        response = await client.post("/predict", files=files(*payloads), params={"top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"]) == ("tiny-test", "7")
    assert [r["filename"] for r in body["results"]] == [f"img{i}.png" for i in range(6)]
    for result, data in zip(body["results"], payloads, strict=True):
        expected = offline_top(model_path, data, 3)
        got = [(p["class_id"], p["score"]) for p in result["predictions"]]
        assert [c for c, _ in got] == [c for c, _ in expected]
        assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
        assert [p["label"] for p in result["predictions"]] == [LABELS[c] for c, _ in got]
    assert response.json() == PredictResponse.model_validate_json(response.content).model_dump()
    assert len({r["predictions"][0]["class_id"] for r in body["results"]}) > 1


async def test_predict_raw_body_uses_default_top_k(serve: Serve) -> None:
    async with serve(default_top_k=4) as client:
        response = await client.post(
            "/predict", content=image_bytes(1), headers={"content-type": "image/png"}
        )
    assert response.status_code == 200, response.text
    # The body is written as text (app/http/routes.py): it must be exactly what the model describes.
    parsed = PredictResponse.model_validate_json(response.content, strict=True)
    assert response.json() == parsed.model_dump()
    (result,) = response.json()["results"]
    assert result["filename"] is None
    scores = [p["score"] for p in result["predictions"]]
    assert len(scores) == 4
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("WEBP", "RGB"),
        ("BMP", "RGB"),
        ("GIF", "P"),
        ("TIFF", "CMYK"),
    ],
    ids=lambda value: str(value).lower(),
)
async def test_predict_accepts_allowed_formats_and_modes(serve: Serve, fmt: str, mode: str) -> None:
    async with serve() as client:
        response = await client.post(
            "/predict", files=[("file", ("x", image_bytes(2, fmt, mode=mode), "image/*"))]
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("top_k", ["0", "11", "-1", "abc", "2.5"], ids=str)
async def test_bad_top_k_is_422_naming_the_value(serve: Serve, top_k: str) -> None:
    async with serve() as client:
        response = await client.post(
            "/predict", files=files(image_bytes(0)), params={"top_k": top_k}
        )
    assert_error(response, 422, "invalid_parameter", "top_k", top_k)


FILE_PART = b'Content-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n%s\r\n'
TEXT_PART = b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
MULTIPART = "multipart/form-data; boundary=XyZ"
PNG = image_bytes(3)
TRUNCATED_PNG = PNG[: len(PNG) // 2]

BAD_REQUESTS: list[Any] = [
    pytest.param({}, None, 400, "empty_upload", "no image", id="no-body"),
    pytest.param(
        {"content-type": "image/png"}, b"", 400, "empty_upload", "0 bytes", id="empty-raw"
    ),
    pytest.param(
        {"content-type": MULTIPART},
        join_parts([FILE_PART % b""]),
        400,
        "empty_upload",
        "a.png",
        id="empty-file",
    ),
    pytest.param(
        {"content-type": MULTIPART}, join_parts([]), 400, "empty_upload", "no files", id="no-files"
    ),
    pytest.param(
        {"content-type": MULTIPART},
        join_parts([TEXT_PART]),
        400,
        "invalid_multipart",
        "'note'",
        id="text-field",
    ),
    pytest.param(
        {"content-type": "multipart/form-data"},
        b"x",
        400,
        "invalid_multipart",
        "Missing boundary in multipart.",
        id="no-boundary",
    ),
    pytest.param(
        {"content-type": MULTIPART},
        join_parts([FILE_PART % PNG] * 3),
        400,
        "invalid_multipart",
        "max_images_per_request=2",
        id="too-many-files",
    ),
    pytest.param(
        {"content-type": "text/plain"},
        b"hello",
        415,
        "unsupported_media_type",
        "text/plain",
        id="text-plain",
    ),
    pytest.param(
        {"content-type": "image/png"},
        b"not an image at all",
        415,
        "unsupported_media_type",
        "allowed format",
        id="not-an-image",
    ),
    pytest.param(
        {"content-type": "image/png"},
        TRUNCATED_PNG,
        422,
        "invalid_image",
        "PNG",
        id="truncated-png",
    ),
    pytest.param(
        {"content-type": MULTIPART},
        join_parts([FILE_PART % TRUNCATED_PNG]),
        422,
        "invalid_image",
        "image 0 ('a.png')",
        id="truncated-file",
    ),
    pytest.param(
        {"content-type": "image/png"},
        image_bytes(4, size=(200, 200)),
        413,
        "too_many_pixels",
        "max_image_pixels",
        id="too-many-pixels",
    ),
    pytest.param(
        {"content-type": "image/bmp"},
        image_bytes(5, "BMP", size=(60, 60)),
        413,
        "payload_too_large",
        "max_image_bytes=5000",
        id="image-over-max-image-bytes",
    ),
    pytest.param(
        {"content-type": MULTIPART},
        join_parts([FILE_PART % image_bytes(5, "BMP", size=(60, 60))]),
        413,
        "payload_too_large",
        "max_image_bytes=5000",
        id="file-over-max-image-bytes",
    ),
    pytest.param(
        {"content-type": "image/bmp"},
        b"x" * 20_001,
        413,
        "payload_too_large",
        "max_request_bytes=20000",
        id="content-length-over-max-request-bytes",
    ),
]


@pytest.mark.parametrize(("headers", "content", "status", "code", "fragment"), BAD_REQUESTS)
async def test_bad_requests_get_a_clear_4xx(
    serve: Serve,
    headers: dict[str, str],
    content: bytes | None,
    status: int,
    code: str,
    fragment: str,
) -> None:
    limits = {
        "max_images_per_request": 2,
        "max_image_pixels": 10_000,
        "max_image_bytes": 5000,
        "max_request_bytes": 20_000,
    }
    async with serve(**limits) as client:
        response = await client.post("/predict", content=content, headers=headers)
    assert_error(response, status, code, fragment)


async def test_request_byte_limit_is_enforced_while_streaming(serve: Serve) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1000
            yield b"x" * 1000

    async with serve(max_request_bytes=20_000) as client:
        response = await client.post(
            "/predict", content=endless(), headers={"content-type": "image/png"}
        )
    assert_error(response, 413, "payload_too_large", "max_request_bytes=20000")
    assert sent <= 22_000


async def test_request_pixel_budget_is_checked_before_any_decoding(serve: Serve) -> None:
    # 3 images of 40x30: each under max_image_pixels, together over max_request_pixels.
    async with serve(max_image_pixels=2000, max_request_pixels=3000) as client:
        response = await client.post("/predict", files=files(*(image_bytes(i) for i in range(3))))
        decoded = client._transport.app.state.service.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
            "resnet_serve_preprocess_seconds_count"
        )
    assert_error(response, 413, "too_many_pixels", "3600 pixels", "max_request_pixels=3000")
    assert decoded == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("GET", "/predict", 405, "method_not_allowed")],
    ids=["404", "405"],
)
async def test_framework_errors_use_the_same_shape(
    serve: Serve, method: str, path: str, status: int, code: str
) -> None:
    async with serve() as client:
        response = await client.request(method, path, headers={"x-request-id": "abc-123"})
    assert_error(response, status, code, path)
    assert response.json()["error"]["request_id"] == "abc-123"


async def test_request_id_is_generated_when_missing_or_unsafe(serve: Serve) -> None:
    async with serve() as client:
        plain = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(3)]
        unsafe = await client.get("/healthz", headers={"x-request-id": "a b\tc"})
    assert len(set(plain)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", rid) for rid in plain), plain
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", unsafe.headers["x-request-id"])


async def test_unexpected_exception_is_500_with_the_error_shape(serve: Serve) -> None:
    async with serve() as client:
        app = client._transport.app  # type: ignore[attr-defined]

        async def boom() -> None:
            raise RuntimeError("secret internals")

        app.add_api_route("/boom", boom)
        response = await client.get("/boom")
    assert_error(response, 500, "internal_error")
    assert "secret" not in response.text


class GatedModel(OnnxModel):
    """The real tiny model, with hooks that hold warm-up or inference until a test says go."""

    def __init__(self, model: OnnxModel) -> None:
        super().__init__(model._session, model.metadata)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.gate_warm_up = True
        self.warming = threading.local()  # per lane: the lanes warm up at once
        self.fail_next = False

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        if self.gate_warm_up:
            self.release.wait()
        self.warming.now = True
        super().warm_up(batch_sizes)
        self.warming.now = False

    def self_check(self, batch: int) -> None:
        self.warming.now = True  # nor is its check of the outputs
        try:
            super().self_check(batch)
        finally:
            self.warming.now = False

    def time_runs(self, batch_sizes: Iterable[int]) -> dict[int, float]:
        self.warming.now = True  # warm-up's timed runs are not held either
        try:
            return super().time_runs(batch_sizes)
        finally:
            self.warming.now = False

    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        if getattr(self.warming, "now", False):
            return super().run(images, outputs, class_ids)
        self.entered.set()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device on fire")
        self.release.wait()
        return super().run(images, outputs, class_ids)


@pytest.fixture
def gated(make_settings: Any) -> GatedModel:
    return GatedModel(OnnxModel.load(runtime_config(make_settings())))


async def test_not_ready_until_warmed_up_then_ready(gated: GatedModel, make_settings: Any) -> None:
    app = create_app(make_settings(), gated)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert_error(await client.get("/readyz"), 503, "not_ready", "warming up")
            assert_error(await client.post("/predict", files=files(PNG)), 503, "not_ready")
            assert (await client.get("/healthz")).status_code == 200
            gated.release.set()
            await app.state.service.lifecycle.wait_warmed()
            assert (await client.get("/readyz")).json() == {"status": "ready"}
            model = (await client.get("/v1/model")).json()
    assert model["batching"]["warmed_batch_sizes"] == [1, 2, 3, 4]


async def test_every_inference_lane_is_warm_before_readiness(make_settings: Any) -> None:
    model = OnnxModel.load(runtime_config(make_settings()))
    app = create_app(make_settings(concurrent_batches=3), model)
    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        assert model._bound is not None
        assert next(model._bound._lanes) == 3  # three threads have bound their buffers
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = await asyncio.gather(
                *(client.post("/predict", files=files(image_bytes(s))) for s in range(6))
            )
    assert [a.status_code for a in answers] == [200] * 6


class FlatModel(OnnxModel):
    """The real tiny model, 60 ms an image whatever the batch: as a big model on one CPU core."""

    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        time.sleep(0.06 * len(images))
        return super().run(images, outputs, class_ids)


async def test_warm_up_limits_batches_where_the_cost_per_image_is_flat(
    make_settings: Any,
) -> None:
    settings = make_settings(flat_batch_ms=100.0)
    app = create_app(settings, FlatModel.load(runtime_config(settings)))
    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = await asyncio.gather(
                *(client.post("/predict", files=files(image_bytes(s))) for s in range(8))
            )
            model = (await client.get("/v1/model")).json()
        registry = app.state.service.metrics.registry
    assert [a.status_code for a in answers] == [200] * 8
    # 60 ms for one image, 120 ms for two: the first size at 100 ms, not max_batch_size=4.
    assert model["batching"]["batch_limit"] == 2
    batches = registry.get_sample_value("resnet_serve_batch_size_count", TINY)
    assert (
        registry.get_sample_value("resnet_serve_batch_size_bucket", TINY | {"le": "2.0"}) == batches
    )
    assert registry.get_sample_value("resnet_serve_batch_size_sum", TINY) == 8


async def test_draining_turns_readiness_and_admission_to_503(serve: Serve) -> None:
    async with serve() as client:
        client._transport.app.state.service.lifecycle.draining = True  # type: ignore[attr-defined]
        assert_error(await client.get("/readyz"), 503, "shutting_down")
        response = await client.post("/predict", files=files(PNG))
    assert_error(response, 503, "shutting_down")
    assert response.headers["retry-after"] == "1"


async def test_failed_inference_is_500_and_the_service_goes_on(
    serve: Serve, gated: GatedModel
) -> None:
    gated.gate_warm_up = False
    gated.release.set()
    async with serve(gated) as client:
        gated.fail_next = True
        failed = await client.post("/predict", files=files(PNG))
        recovered = await client.post("/predict", files=files(PNG))
    assert_error(failed, 500, "inference_failed", "device on fire")
    assert recovered.status_code == 200


async def test_overload_is_503_before_the_body_is_read(
    gated: GatedModel, make_settings: Any
) -> None:
    gated.gate_warm_up = False
    gated.release.clear()
    app = create_app(make_settings(request_timeout_ms=1500, retry_after_s=2), gated)
    bodies_read = 0

    async def counting() -> AsyncIterator[bytes]:
        nonlocal bodies_read
        bodies_read += 1
        yield PNG

    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        # As if measured: 1 s per image. One image in flight leaves room for no second one.
        for _ in range(50):
            app.state.service.models.resolve().estimate.observe_batch(1, 1.0)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.ensure_future(client.post("/predict", files=files(PNG)))
            await asyncio.to_thread(gated.entered.wait)
            headers = {"content-type": "image/png"}
            second = await client.post("/predict", content=counting(), headers=headers)
            gated.release.set()
            assert (await first).status_code == 200
    assert_error(second, 503, "overloaded", "predicted wait", "request_timeout_ms=1500")
    assert second.headers["retry-after"] == "2"
    assert bodies_read == 0


async def test_past_the_deadline_is_504_without_using_the_model(make_settings: Any) -> None:
    app = create_app(make_settings(request_timeout_ms=1e-6))
    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        app.state.service.models.resolve().estimate.seconds_per_image = (
            0.0  # admitted: the deadline is what fails it
        )
        registry = app.state.service.metrics.registry
        before = registry.get_sample_value("resnet_serve_images_total", TINY)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/predict", files=files(PNG))
        assert registry.get_sample_value("resnet_serve_images_total", TINY) == before
    assert_error(response, 504, "timeout", "request_timeout_ms")


async def test_health_model_and_metrics_endpoints(serve: Serve) -> None:
    async with serve() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        await client.post("/predict", files=files(PNG, image_bytes(9)))
        model = (await client.get("/v1/model")).json()
        metrics = await client.get("/metrics")
    assert model["labels"] == LABELS
    assert model["input"] == {"name": "images", "dtype": "uint8", "shape": ["N", 16, 16, 3]}
    assert model["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert model["accuracy"]["top1"] == 0.5
    assert model["provider"] == "CPUExecutionProvider"
    assert model["batching"]["max_batch_size"] == 4
    assert model["batching"]["batch_limit"] == 4  # flat_batch_ms is out of reach in tests
    found = families(metrics.text)
    assert found["resnet_serve_batch_limit"].samples[0].value == 4
    (info,) = found["resnet_serve_model_info"].samples
    assert model["backend"]["name"] == "onnxruntime"
    assert model["file_precision"] == model["precision"] == "fp32"
    assert info.labels == TINY | {
        "provider": "CPUExecutionProvider",
        "backend": "onnxruntime",
        "precision": "fp32",
        "build": "7",
    }
    (images,) = [s for s in found["resnet_serve_images"].samples if s.name.endswith("_total")]
    assert images.value == 2
    requests = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in found["resnet_serve_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/predict", "200")] == 1
    for name in (
        "resnet_serve_request_duration_seconds",
        "resnet_serve_preprocess_seconds",
        "resnet_serve_queue_wait_seconds",
        "resnet_serve_inference_seconds",
        "resnet_serve_batch_size",
        "resnet_serve_queue_depth",
    ):
        assert name in found


async def test_openapi_describes_the_response_and_error_models(serve: Serve) -> None:
    async with serve() as client:
        schema = (await client.get("/openapi.json")).json()
    predict = schema["paths"]["/predict"]["post"]
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/PredictResponse"}
    assert set(predict["requestBody"]["content"]) == {
        "multipart/form-data",
        "image/*",
        "application/json",  # {"urls": [...]}
    }
    for status in ("400", "413", "415", "422", "503", "504"):
        error = predict["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    components = schema["components"]["schemas"]
    assert set(components["Prediction"]["properties"]) == {"label", "class_id", "score"}
    assert "/v1/model" in schema["paths"]


async def test_client_disconnect_cancels_the_pending_work() -> None:
    async def receive() -> dict[str, str]:
        return {"type": "http.disconnect"}

    never = asyncio.Event()
    work = asyncio.ensure_future(never.wait())
    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(ClientClosedRequest):
        await unless_disconnected(request.receive, work)
    await asyncio.gather(work, return_exceptions=True)
    assert work.cancelled()
