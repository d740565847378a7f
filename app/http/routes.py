"""HTTP endpoints: translate requests to the classifier's calls and its answers to JSON."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request, Response
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

from app.batching.admission import Lifecycle
from app.errors import NotReady, UnknownModel
from app.http.deps import LifecycleDep, MetricsDep, ModelsDep, TicketDep, UploadLimitsDep
from app.http.disconnect import unless_disconnected
from app.http.openapi import ERRORS, PREDICT_BODY
from app.http.routing import Access, access
from app.http.schemas import (
    Batching,
    Candidate,
    ErrorResponse,
    InputSpec,
    ModelDescription,
    ModelList,
    PredictResponse,
    Runtime,
    Status,
)
from app.http.uploads import read_uploads
from app.repository.models import Models
from app.repository.version import ServedModel
from core.contract import INPUT_NAME

router = APIRouter()

TopK = Annotated[
    int | None, Query(ge=1, description="Predictions per image; 1..num_classes (default: setting)")
]
ModelName = Annotated[
    str | None, Query(max_length=128, description="The model (default: the default model)")
]
ModelVersion = Annotated[
    str | None,
    Query(max_length=64, description="Its version (default: its newest ready version)"),
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
    models: ModelsDep,
    limits: UploadLimitsDep,
    ticket: TicketDep,
    top_k: TopK = None,
    model: ModelName = None,
    version: ModelVersion = None,
) -> Response:
    with models.resolve(model, version).hold() as served:
        classifier = served.classifier
        k = classifier.top_k_or_default(top_k)
        images = await read_uploads(request, limits)
        probabilities = await unless_disconnected(request, classifier.classify(images, ticket))
    # A PredictResponse, dumped by orjson: validating pydantic models per prediction cost a
    # measurable share of a request's event-loop time (tests hold the body to the model).
    results = [
        {
            "filename": image.name,
            "predictions": [ranked._asdict() for ranked in classifier.top_k(row, k)],
        }
        for image, row in zip(images, probabilities, strict=True)
    ]
    body = {"model_name": served.name, "model_version": served.version, "results": results}
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
async def readyz(lifecycle: LifecycleDep, models: ModelsDep) -> Status:
    check_ready(lifecycle, models)
    return Status(status="ready")


def check_ready(lifecycle: Lifecycle, models: Models) -> None:
    """Warm, not draining, no lane stuck, and a version of the default model ready."""
    lifecycle.check_ready()
    try:
        models.resolve()
    except UnknownModel as exc:
        raise NotReady(exc.message, headers=lifecycle.retry_after) from None


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    openapi_extra=access(Access.METRICS),
)
async def metrics_endpoint(request: Request, metrics: MetricsDep) -> Response:
    # OpenMetrics (with the exemplars: trace ids on latency buckets) for scrapers that ask for
    # it, as Prometheus does; the plain text format for everyone else.
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(metrics.render(openmetrics=True), media_type=OPENMETRICS)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get(
    "/v1/model",
    response_model=ModelDescription,
    responses={404: ERRORS[404]},
    openapi_extra=access(Access.API),
    summary="A model being served: the default one, or the one named",
)
async def describe_model(
    models: ModelsDep, model: ModelName = None, version: ModelVersion = None
) -> ModelDescription:
    return describe(models.resolve(model, version))


@router.get(
    "/v1/models",
    response_model=ModelList,
    openapi_extra=access(Access.API),
    summary="Every model version being served",
)
async def list_models(models: ModelsDep) -> ModelList:
    ready = sorted(models.ready(), key=lambda s: (s.name, models.versions(s.name).index(s.version)))
    default = models.resolve() if ready else None
    return ModelList(
        default_model=default.name if default else None,
        models=[describe(served) for served in ready],
    )


def describe(served: ServedModel) -> ModelDescription:
    metadata, batching = served.metadata, served.batcher.config
    crop = metadata.recipe.crop_size
    return ModelDescription(
        name=served.name,
        version=served.version,
        build=metadata.version,
        architecture=metadata.architecture,
        precision=served.model.precision,
        file_precision=metadata.precision,
        num_classes=metadata.num_classes,
        labels=list(metadata.labels),
        input=InputSpec(name=INPUT_NAME, dtype="uint8", shape=["N", crop, crop, 3]),
        preprocessing=metadata.preprocessing.to_dict(),
        accuracy=metadata.accuracy,
        source_sha256=metadata.source_sha256,
        provider=served.provider,
        backend=Runtime(
            name=served.model.backend, candidates=[Candidate(**c) for c in served.model.choice]
        ),
        batching=Batching(
            max_batch_size=batching.max_batch_size,
            batch_limit=served.batcher.limit,
            max_wait_ms=batching.max_wait_ms,
            max_queue_images=batching.max_queue_images,
            request_timeout_ms=batching.request_timeout_ms,
            warmed_batch_sizes=list(batching.buckets),
        ),
    )
