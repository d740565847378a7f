"""The protocol's endpoints under /v2: thin translations to the Classifier that /predict uses.

Health and readiness mean what /healthz and /readyz mean; infer requests are admitted at the
door (app.http.intake) and bounded like /predict's; errors are ``{"error": "..."}``
(app.http.handlers).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.batching.admission import Ticket
from app.http.deps import LifecycleDep, ModelsDep, TicketDep, UploadLimitsDep
from app.http.disconnect import unless_disconnected
from app.http.routes import check_ready
from app.http.routing import Access, access
from app.http.uploads import UploadLimits
from app.oip.codec import HEADER_LENGTH, encode_response, parse_request
from app.oip.protocol import (
    InferenceRequest,
    ModelMetadataResponse,
    ProtocolError,
    ServerMetadataResponse,
    TensorMetadata,
)
from app.oip.tensors import (
    encoded_images,
    output_tensor,
    the_input,
    uint8_crops,
    wanted_outputs,
)
from app.pipeline.pipeline import Image
from app.repository.models import Models
from app.repository.version import ServedModel
from core.contract import INPUT_NAME, OUTPUT_NAME
from core.errors import EmptyUpload

# Triton's name for an ONNX file on ONNX Runtime; on OpenVINO the same form: "openvino_onnx".
PLATFORM = "{backend}_onnx"
EXTENSIONS = ["binary_tensor_data", "classification"]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolError} for status in (400, 404, 413, 415, 422, 500, 503, 504)
}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
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
            "application/json": {"schema": _inlined(InferenceRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "minLength": 1}
            },
        },
    }
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], responses=ERRORS)


OPEN = access(Access.OPEN)
PROBE = access(Access.PROBE)
# Model metadata is guarded like /v1/model; inference is also admitted at the door.
MODEL = access(Access.API)
INFER = access(Access.INFERENCE, **INFER_BODY)


@router.get(
    "", response_model=ServerMetadataResponse, openapi_extra=OPEN, summary="Server metadata"
)
async def server_metadata(request: Request) -> ServerMetadataResponse:
    return ServerMetadataResponse(
        name=request.app.title, version=request.app.version, extensions=EXTENSIONS
    )


@router.get(
    "/health/live", response_class=Response, openapi_extra=PROBE, summary="Liveness (as /healthz)"
)
async def live() -> Response:
    return Response()


@router.get(
    "/health/ready", response_class=Response, openapi_extra=PROBE, summary="Readiness (as /readyz)"
)
async def ready(lifecycle: LifecycleDep, models: ModelsDep) -> Response:
    check_ready(lifecycle, models)
    return Response()


@router.get("/models/{model_name}", response_model=ModelMetadataResponse, openapi_extra=MODEL)
async def model_metadata(model_name: str, models: ModelsDep) -> ModelMetadataResponse:
    return describe(models, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadataResponse,
    openapi_extra=MODEL,
)
async def version_metadata(
    model_name: str, model_version: str, models: ModelsDep
) -> ModelMetadataResponse:
    return describe(models, model_name, model_version)


@router.get(
    "/models/{model_name}/ready",
    response_class=Response,
    openapi_extra=MODEL,
    summary="Model readiness (as /readyz)",
)
async def model_ready(model_name: str, models: ModelsDep, lifecycle: LifecycleDep) -> Response:
    models.resolve(model_name, None)
    lifecycle.check_admitting()
    return Response()


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_class=Response,
    openapi_extra=MODEL,
    summary="Model readiness",
)
async def version_ready(
    model_name: str, model_version: str, models: ModelsDep, lifecycle: LifecycleDep
) -> Response:
    models.resolve(model_name, model_version)
    lifecycle.check_admitting()
    return Response()


@router.post(
    "/models/{model_name}/infer",
    openapi_extra=INFER,
    summary="Inference (JSON or binary tensor data)",
)
async def infer(
    request: Request,
    model_name: str,
    models: ModelsDep,
    limits: UploadLimitsDep,
    ticket: TicketDep,
) -> Response:
    with models.resolve(model_name, None).hold() as served:
        return await _infer(request, served, limits, ticket)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    openapi_extra=INFER,
    summary="Inference",
)
async def infer_version(
    request: Request,
    model_name: str,
    model_version: str,
    models: ModelsDep,
    limits: UploadLimitsDep,
    ticket: TicketDep,
) -> Response:
    with models.resolve(model_name, model_version).hold() as served:
        return await _infer(request, served, limits, ticket)


async def _infer(
    request: Request, served: ServedModel, limits: UploadLimits, ticket: Ticket | None
) -> Response:
    classifier = served.classifier
    body = await request.body()
    if not body:
        raise EmptyUpload("the request body is empty (0 bytes): send an inference request")
    inference, parts = parse_request(body, request.headers.get(HEADER_LENGTH))
    spec, binary = the_input(inference, parts)
    wanted = wanted_outputs(inference, classifier.metadata.num_classes)
    if spec.datatype == "BYTES":
        images = [Image(None, data) for data in encoded_images(spec, binary, limits)]
        work = classifier.classify(images, ticket)
    else:
        crops = uint8_crops(spec, binary, classifier.metadata.recipe.crop_size, limits)
        work = classifier.infer(crops, ticket)
    probabilities = await unless_disconnected(request, work)
    header: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    if inference.id is not None:
        header["id"] = inference.id
    outputs = [output_tensor(classifier, probabilities, one) for one in wanted]
    content, header_length = encode_response(header, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


def describe(models: Models, name: str, version: str | None) -> ModelMetadataResponse:
    served = models.resolve(name, version)
    metadata = served.metadata
    crop = metadata.recipe.crop_size
    return ModelMetadataResponse(
        name=served.name,
        versions=[version] if version is not None else models.versions(name),
        platform=PLATFORM.format(backend=served.model.backend),
        # The graph's input; BYTES [-1] of encoded images is accepted under the same name.
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="UINT8", shape=[-1, crop, crop, 3])],
        outputs=[
            TensorMetadata(name=OUTPUT_NAME, datatype="FP32", shape=[-1, metadata.num_classes])
        ],
    )
