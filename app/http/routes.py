"""HTTP endpoints: translate requests to the classifier's calls and its answers to JSON."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request, Response

from app.http.access import Access, access
from app.http.deps import ClassifierDep, LifecycleDep, MetricsDep, TicketDep, UploadLimitsDep
from app.http.disconnect import unless_disconnected
from app.http.openapi import ERRORS, PREDICT_BODY
from app.http.schemas import (
    Batching,
    ErrorResponse,
    InputSpec,
    ModelDescription,
    PredictResponse,
    Status,
)
from app.http.uploads import read_uploads
from core.contract import INPUT_NAME

router = APIRouter()

TopK = Annotated[
    int | None, Query(ge=1, description="Predictions per image; 1..num_classes (default: setting)")
]


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=access(Access.INFERENCE, **PREDICT_BODY),
    summary="Classify one or many images (multipart files, or one image as the raw body)",
)
async def predict(
    request: Request,
    classifier: ClassifierDep,
    limits: UploadLimitsDep,
    ticket: TicketDep,
    top_k: TopK = None,
) -> Response:
    k = classifier.top_k_or_default(top_k)
    images = await read_uploads(request, limits)
    probabilities = await unless_disconnected(request, classifier.classify(images, ticket))
    metadata = classifier.metadata
    # A PredictResponse, dumped by orjson: validating pydantic models per prediction cost a
    # measurable share of a request's event-loop time (tests hold the body to the model).
    results = [
        {
            "filename": image.name,
            "predictions": [ranked._asdict() for ranked in classifier.top_k(row, k)],
        }
        for image, row in zip(images, probabilities, strict=True)
    ]
    body = {"model_name": metadata.name, "model_version": metadata.version, "results": results}
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/healthz",
    response_model=Status,
    openapi_extra=access(Access.PROBE),
    summary="Liveness: the process is serving HTTP",
)
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": ErrorResponse, "description": "Warming up or shutting down"}},
    openapi_extra=access(Access.PROBE),
    summary="Readiness: model loaded and warmed up for every batch size, not shutting down",
)
async def readyz(lifecycle: LifecycleDep) -> Status:
    lifecycle.check_admitting()
    return Status(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    openapi_extra=access(Access.METRICS),
)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get(
    "/v1/model",
    response_model=ModelDescription,
    openapi_extra=access(Access.API),
    summary="The model being served",
)
async def describe_model(classifier: ClassifierDep) -> ModelDescription:
    metadata, batching = classifier.metadata, classifier.batcher.config
    crop = metadata.recipe.crop_size
    return ModelDescription(
        name=metadata.name,
        version=metadata.version,
        architecture=metadata.architecture,
        precision=metadata.precision,
        num_classes=metadata.num_classes,
        labels=list(metadata.labels),
        input=InputSpec(name=INPUT_NAME, dtype="uint8", shape=["N", crop, crop, 3]),
        preprocessing=metadata.preprocessing.to_dict(),
        accuracy=metadata.accuracy,
        source_sha256=metadata.source_sha256,
        provider=classifier.model.provider,
        batching=Batching(
            max_batch_size=batching.max_batch_size,
            batch_limit=classifier.batcher.limit,
            max_wait_ms=batching.max_wait_ms,
            max_queue_images=batching.max_queue_images,
            request_timeout_ms=batching.request_timeout_ms,
            warmed_batch_sizes=classifier.admission.lifecycle.warmed_batch_sizes,
        ),
    )
