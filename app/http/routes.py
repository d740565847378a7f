"""The service's own HTTP endpoints beside ``/predict``: health, readiness, metrics, and the models
being served."""

from __future__ import annotations

from contextlib import suppress

from fastapi import APIRouter, Request, Response
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

from app.edge.access import Access, access
from app.errors import RolloutNotFound
from app.http.openapi import ERRORS, MODEL_REQUIRED
from app.http.predict import ModelName, ModelVersion
from app.http.schemas import (
    Batching,
    Candidate,
    ErrorResponse,
    InputSpec,
    ModelDescription,
    ModelList,
    Runtime,
    Status,
)
from app.repository.version import ServedModel
from app.service import Service
from core.contract import INPUT_NAME

router = APIRouter()


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
async def readyz(request: Request) -> Status:
    service: Service = request.app.state.service
    service.check_ready()
    return Status(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    openapi_extra=access(Access.METRICS),
)
async def metrics_endpoint(request: Request) -> Response:
    metrics = request.app.state.service.metrics
    # OpenMetrics (with the exemplars: trace ids on latency buckets) for scrapers that ask for
    # it, as Prometheus does; the plain text format for everyone else.
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(metrics.render(openmetrics=True), media_type=OPENMETRICS)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get(
    "/v1/model",
    response_model=ModelDescription,
    responses={400: {"model": ErrorResponse, "description": MODEL_REQUIRED}, 404: ERRORS[404]},
    openapi_extra=access(Access.API),
    summary="A model being served: the default one, or the one named",
)
async def describe_model(
    request: Request, model: ModelName = None, version: ModelVersion = None
) -> ModelDescription:
    service: Service = request.app.state.service
    described = describe(service.models.resolve(model, version))
    with suppress(RolloutNotFound):  # the page's model card shows it
        described.rollout = await service.rollout_state(described.name)
    return described


@router.get(
    "/v1/models",
    response_model=ModelList,
    openapi_extra=access(Access.API),
    summary="Every model version being served",
)
async def list_models(request: Request) -> ModelList:
    service: Service = request.app.state.service
    models = service.models
    ready = sorted(models.ready(), key=lambda s: (s.name, models.versions(s.name).index(s.version)))
    return ModelList(
        default_model=models.default_name,
        models=[describe(served) for served in ready],
        images_by_url=service.url_policy.on,  # the page offers a URL field where it is
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
