"""The Open Inference Protocol over REST, under /v2: its routes translate HTTP to the protocol's
recipe (app.oip.serving) and back; ``/predict``'s pipeline serves them.

Health and readiness mean what /healthz and /readyz mean; infer requests are admitted at the
door (app.http.middleware) and bounded like /predict's; errors are ``{"error": "..."}``
(app.http.handlers).

The repository extension (``repository``): the index, load and unload (Triton's and MLServer's
``/v2/repository`` routes; ``tritonclient``'s ``get_model_repository_index``, ``load_model`` and
``unload_model`` work unchanged), guarded by the repository keys (app.edge.access). A load brings
the model to its version policy: the server's, or Triton's ``version_policy`` in the request's
``config`` parameter (kept for that model until a load without one). It answers once the new
versions serve, or 400 naming each version that failed while the old ones keep serving. With
several workers, every worker applies the change before the answer (app.repository.link).
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError

from app.edge.access import Access, access
from app.edge.requests import MODEL_VERSION_HEADER, unless_disconnected
from app.oip import serving
from app.oip.codec import HEADER_LENGTH, encode_response, parse_request
from app.oip.protocol import (
    InferenceRequest,
    ModelMetadataResponse,
    ProtocolError,
    ServerMetadataResponse,
)
from app.repository.sources import check_name
from app.service import Service
from core.errors import BadRequest, EmptyUpload

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolError} for status in (400, 403, 404, 413, 415, 422, 500, 503, 504)
}


def inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's schema with its local ``$defs`` references resolved in place (OpenAPI would
    resolve ``#/$defs/...`` against the whole document, where they do not exist)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# The body is read raw (the binary extension puts tensor bytes after the JSON header), so FastAPI
# cannot infer it: a JSON inference request, or JSON + binary tensor data.
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inlined(InferenceRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "minLength": 1}
            },
        },
    }
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], responses=ERRORS)
repository = APIRouter(
    prefix="/v2/repository",
    tags=["Open Inference Protocol: model repository"],
    responses={status: {"model": ProtocolError} for status in (400, 401, 403, 404)},
)

OPEN = access(Access.OPEN)
PROBE = access(Access.PROBE)
# Model metadata is guarded like /v1/model; inference is also admitted at the door.
MODEL = access(Access.API)
INFER = access(Access.INFERENCE, **INFER_BODY)
REPOSITORY = access(Access.REPOSITORY)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


@router.get(
    "", response_model=ServerMetadataResponse, openapi_extra=OPEN, summary="Server metadata"
)
async def server_metadata() -> ServerMetadataResponse:
    return serving.server_metadata()


@router.get(
    "/health/live", response_class=Response, openapi_extra=PROBE, summary="Liveness (as /healthz)"
)
async def live() -> Response:
    return Response()


@router.get(
    "/health/ready", response_class=Response, openapi_extra=PROBE, summary="Readiness (as /readyz)"
)
async def ready(request: Request) -> Response:
    _service(request).check_ready()
    return Response()


@router.get("/models/{model_name}", response_model=ModelMetadataResponse, openapi_extra=MODEL)
async def model_metadata(model_name: str, request: Request) -> ModelMetadataResponse:
    return serving.model_metadata(_service(request), model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadataResponse,
    openapi_extra=MODEL,
)
async def version_metadata(
    model_name: str, model_version: str, request: Request
) -> ModelMetadataResponse:
    return serving.model_metadata(_service(request), model_name, model_version)


@router.get(
    "/models/{model_name}/ready",
    response_class=Response,
    openapi_extra=MODEL,
    summary="Model readiness (as /readyz)",
)
async def model_ready(model_name: str, request: Request) -> Response:
    serving.check_model_ready(_service(request), model_name, None)
    return Response()


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_class=Response,
    openapi_extra=MODEL,
    summary="Model readiness",
)
async def version_ready(model_name: str, model_version: str, request: Request) -> Response:
    serving.check_model_ready(_service(request), model_name, model_version)
    return Response()


@router.post(
    "/models/{model_name}/infer",
    openapi_extra=INFER,
    summary="Inference (JSON or binary tensor data)",
)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(request, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    openapi_extra=INFER,
    summary="Inference",
)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, model_name, model_version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    service = _service(request)
    with service.route(name, version).hold() as route:
        body = await request.body()
        if not body:
            raise EmptyUpload("the request body is empty (0 bytes): send an inference request")
        inference, parts = parse_request(body, request.headers.get(HEADER_LENGTH))
        header, outputs = await serving.infer(
            service,
            route,
            inference,
            parts,
            lambda work: unless_disconnected(request.receive, work),
        )
    content, header_length = encode_response(header, outputs)
    answered = {MODEL_VERSION_HEADER: header["model_version"]}
    if header_length is None:
        return Response(content, media_type="application/json", headers=answered)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)} | answered,
    )


class IndexRequest(BaseModel):
    ready: bool = False


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str


class ControlRequest(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict)


@repository.post(
    "/index",
    response_model=list[IndexEntry],
    openapi_extra=REPOSITORY,
    summary="Every model and version, with its state",
)
async def index(request: Request) -> list[IndexEntry]:
    wanted = await _body(request, IndexRequest)
    return [
        IndexEntry(name=e.name, version=e.version, state=e.state.value, reason=e.reason)
        for e in serving.index(_service(request), wanted.ready)
    ]


@repository.post(
    "/models/{model_name}/load",
    response_class=Response,
    openapi_extra=REPOSITORY,
    summary="Load the model to its version policy (200 once its new versions serve)",
)
async def load(model_name: str, request: Request) -> Response:
    control = await _body(request, ControlRequest)
    policy = serving.policy_from_config(control.parameters.get("config"))
    await serving.load(_service(request), check_name(model_name), policy)
    return Response()


@repository.post(
    "/models/{model_name}/unload",
    response_class=Response,
    openapi_extra=REPOSITORY,
    summary="Unload every version of the model (200 once they have answered what they held)",
)
async def unload(model_name: str, request: Request) -> Response:
    await _body(request, ControlRequest)
    await serving.unload(_service(request), check_name(model_name))
    return Response()


M = TypeVar("M", bound=BaseModel)


async def _body(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body) if body.strip() else model()
    except ValidationError as exc:
        raise BadRequest(f"invalid request: {exc.errors()[0]['msg']}") from None
