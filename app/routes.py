"""HTTP endpoints. Handlers stay thin: uploads, decoding and batching live in their own modules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from app.batcher import Batcher
from app.errors import ClientClosedRequest, InvalidImage, InvalidParameter, ServiceError
from app.preprocess import Limits, Recipe, decode
from app.schemas import (
    Batching,
    ErrorResponse,
    ImageResult,
    InputSpec,
    ModelDescription,
    Prediction,
    PredictResponse,
    Status,
)
from app.state import (
    BatcherDep,
    DecoderDep,
    LifecycleDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
)
from app.uploads import read_uploads

T = TypeVar("T")
router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Empty or missing upload, malformed multipart body",
        413: "Over max_request_bytes, max_image_bytes or max_image_pixels",
        415: "Not multipart/image content, or not an allowed image format",
        422: "Corrupt or truncated image, or an invalid query parameter",
        500: "Inference failed for the batch holding this request",
        503: "Overloaded, warming up or shutting down; see Retry-After",
        504: "Waited in the queue past request_timeout_ms",
    }.items()
}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                },
                "encoding": {"files": {"contentType": "image/*"}},
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
TopK = Annotated[
    int | None, Query(ge=1, description="Predictions per image; 1..num_classes (default: setting)")
]


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Classify one or many images (multipart files, or one image as the raw body)",
)
async def predict(
    request: Request,
    settings: SettingsDep,
    model: ModelDep,
    batcher: BatcherDep,
    decoder: DecoderDep,
    metrics: MetricsDep,
    lifecycle: LifecycleDep,
    top_k: TopK = None,
) -> Response:
    k = _check_top_k(top_k, settings.default_top_k, model.info.num_classes)
    with lifecycle.admit():
        uploads = await read_uploads(request, settings)
        loop = asyncio.get_running_loop()
        recipe, limits, seconds = model.info.recipe, settings.limits, metrics.preprocess_seconds
        decoding = [
            loop.run_in_executor(decoder, _decode_timed, u.data, recipe, limits, seconds)
            for u in uploads
        ]
        work = _classify(decoding, [u.filename for u in uploads], batcher)
        probabilities = await _unless_disconnected(request, work)
    labels = model.info.labels
    body = PredictResponse(
        model_name=model.info.name,
        model_version=model.info.version,
        results=[
            ImageResult(filename=upload.filename, predictions=_top_k(row, k, labels))
            for upload, row in zip(uploads, probabilities, strict=True)
        ],
    )
    # Already validated by construction; skip FastAPI's second pass through response_model.
    return Response(body.model_dump_json(), media_type="application/json")


def _check_top_k(top_k: int | None, default: int, num_classes: int) -> int:
    if top_k is None:
        return min(default, num_classes)
    if top_k > num_classes:
        raise InvalidParameter(f"top_k={top_k} is out of range 1..{num_classes} (the classes)")
    return top_k


def _decode_timed(data: bytes, recipe: Recipe, limits: Limits, seconds: Any) -> np.ndarray:
    started = time.perf_counter()
    try:
        return decode(data, recipe, limits)
    except ServiceError:
        raise
    except Exception as exc:
        # Untrusted bytes can trip any decoder bug; that is the image's fault, never a 500.
        raise InvalidImage(f"cannot decode the image: {exc!r}") from exc
    finally:
        seconds.observe(time.perf_counter() - started)


async def _classify(
    decoding: list[asyncio.Future[np.ndarray]], filenames: list[str | None], batcher: Batcher
) -> list[np.ndarray]:
    decoded = await asyncio.gather(*decoding, return_exceptions=True)
    for index, (result, filename) in enumerate(zip(decoded, filenames, strict=True)):
        if isinstance(result, ServiceError):
            name = f" ({filename!r})" if filename is not None else ""
            raise type(result)(f"image {index}{name}: {result.message}", headers=result.headers)
        if isinstance(result, BaseException):
            raise result
    return await batcher.submit(decoded)  # type: ignore[arg-type]


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelling it (and its queued images) if the client goes away first.

    Only call once the body has been read: from then on ``receive`` yields only disconnects.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientClosedRequest("the client closed the connection before the answer was ready")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _top_k(probabilities: np.ndarray, k: int, labels: tuple[str, ...]) -> list[Prediction]:
    # Stable sort: equal scores list the lower class id first, deterministically.
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        Prediction(label=labels[i], class_id=int(i), score=float(probabilities[i])) for i in order
    ]


@router.get("/healthz", response_model=Status, summary="Liveness: the process is serving HTTP")
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": ErrorResponse, "description": "Warming up or shutting down"}},
    summary="Readiness: model loaded and warmed up for every batch size, not shutting down",
)
async def readyz(lifecycle: LifecycleDep) -> Status:
    lifecycle.check_admitting()
    return Status(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/model", response_model=ModelDescription, summary="The model being served")
async def describe_model(
    model: ModelDep, settings: SettingsDep, lifecycle: LifecycleDep
) -> ModelDescription:
    info = model.info
    crop = info.recipe.crop_size
    return ModelDescription(
        name=info.name,
        version=info.version,
        architecture=info.architecture,
        precision=info.precision,
        num_classes=info.num_classes,
        labels=list(info.labels),
        input=InputSpec(name="images", dtype="uint8", shape=["N", crop, crop, 3]),
        preprocessing=info.preprocessing,
        accuracy=info.accuracy,
        source_sha256=info.source_sha256,
        provider=model.provider,
        batching=Batching(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_images=settings.max_queue_images,
            request_timeout_ms=settings.request_timeout_ms,
            warmed_batch_sizes=lifecycle.warmed_batch_sizes,
        ),
    )
