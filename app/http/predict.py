"""``POST /predict``: images in (multipart files, or one image as the whole body), the pipeline
with the classify head, top-k JSON out.

The request byte limit is enforced underneath, while the body streams in (app.http.middleware);
reading the uploads adds the per-image and per-request image-count limits.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive, Scope, Send

from app.edge.access import Access, access
from app.edge.requests import MODEL_VERSION_HEADER, unless_disconnected
from app.errors import InvalidMultipart
from app.http.handlers import service_error
from app.http.openapi import ERRORS, PREDICT_BODY
from app.http.schemas import PredictResponse
from app.pipeline.heads import Classify
from app.pipeline.pipeline import Image, UploadLimits
from app.repository.version import ServedModel
from app.service import Service
from core.contract import ModelMetadata
from core.errors import (
    BadRequest,
    EmptyUpload,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

router = APIRouter()

TopK = Annotated[
    int | None, Query(ge=1, description="Predictions per image; 1..num_classes (default: setting)")
]
MODEL_MAX, VERSION_MAX = 128, 64
ModelName = Annotated[
    str | None, Query(max_length=MODEL_MAX, description="The model (default: the default model)")
]
# Read and checked at the door (app.http.middleware), before the body: here for the docs.
TimeoutMs = Annotated[
    float | None,
    Query(
        gt=0,
        description="This request's own deadline in ms, below request_timeout_ms: work that "
        "cannot be answered in time is dropped before decode or compute (504). Or the "
        "X-Request-Timeout-Ms header",
    ),
]
ModelVersion = Annotated[
    str | None,
    Query(max_length=VERSION_MAX, description="Its version (default: its newest ready version)"),
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
    top_k: TopK = None,
    model: ModelName = None,
    version: ModelVersion = None,
    timeout_ms: TimeoutMs = None,
) -> Response:
    return await _predict(request, request.app.state.service, top_k, model, version)


async def direct(service: Service, scope: Scope, receive: Receive, send: Send) -> bool:
    """``POST /predict`` answered straight from the door (app.http.middleware), without FastAPI's
    routing, dependency solving and exception middleware: measured at about a fifth of a
    request's event-loop time (benchmarks/results/slo.md). The same handler and error answers;
    False, with nothing sent, where the query needs FastAPI's validation to say what is wrong
    with it, which then answers as it always has."""
    query = _query(scope["query_string"])
    if query is None:
        return False
    await answer(_predict(Request(scope, receive), service, *query), scope, receive, send)
    return True


async def answer(work: Awaitable[Response], scope: Scope, receive: Receive, send: Send) -> None:
    """Send ``work``'s response, or its ServiceError's, as the app's handlers would."""
    try:
        response = await work
    except ServiceError as exc:
        response = service_error(exc, scope["path"])
    await response(scope, receive, send)


def _query(raw: bytes) -> tuple[int | None, str | None, str | None] | None:
    """top_k, model and version where the route's own validation would pass them; else None."""
    values = plain_query(raw, ("top_k", "model", "version"))
    if values is None:
        return None
    top_k = values.get("top_k")
    if top_k is not None and not (top_k.isascii() and top_k.isdigit() and int(top_k) >= 1):
        return None
    return (int(top_k) if top_k is not None else None), values.get("model"), values.get("version")


def plain_query(raw: bytes, names: tuple[str, ...]) -> dict[str, str] | None:
    """The query's values by name, where each is given once and ``model`` and ``version`` are
    within their lengths; else None (FastAPI's rules decide, and say what is wrong). Unknown
    names are ignored, as FastAPI ignores them."""
    values: dict[str, str] = {}
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if name in values:
            return None  # repeated: FastAPI's rules decide
        values[name] = value
    model, version = values.get("model"), values.get("version")
    if (model is not None and len(model) > MODEL_MAX) or (
        version is not None and len(version) > VERSION_MAX
    ):
        return None
    return {name: values[name] for name in names if name in values}


async def _predict(
    request: Request,
    service: Service,
    top_k: int | None,
    model: str | None,
    version: str | None,
) -> Response:
    def classify(metadata: ModelMetadata) -> Classify:
        return Classify(metadata, top_k, service.default_top_k)

    with service.route(model, version).hold() as route:
        head = classify(route.served.metadata)  # a bad top_k is refused before the body is read
        images = await read_uploads(request, service)
        work = route.images(images, head, classify)
        ranked = await unless_disconnected(request.receive, work)
    served = route.served  # the version that answered
    # A PredictResponse, dumped by orjson: validating pydantic models per prediction cost a
    # measurable share of a request's event-loop time (tests hold the body to the model).
    results = [
        {"filename": image.name, "predictions": [each._asdict() for each in best]}
        for image, best in zip(images, ranked, strict=True)
    ]
    body = {"model_name": served.name, "model_version": served.version, "results": results}
    return Response(orjson.dumps(body), media_type="application/json", headers=answered_by(served))


def answered_by(served: ServedModel) -> dict[str, str]:
    """The answering version in a header too: the access log and the trace read it there."""
    return {MODEL_VERSION_HEADER: served.version}


async def read_uploads(request: Request, service: Service) -> list[Image]:
    """The request's images: multipart files, one image as the body, or ``{"urls": [...]}``
    fetched by the server (app.edge.fetch)."""
    limits = service.limits
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _read_multipart(request, limits)
    elif media_type.startswith("image/"):
        uploads = [Image(None, await _read_raw(request, limits))]
    elif media_type == "application/json":
        uploads = await _fetch_urls(await _read_raw(request, limits), service)
    elif not media_type and request.headers.get("content-length", "0") == "0":
        raise EmptyUpload("no image: send multipart/form-data files or an image/* body")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r} is not accepted; send multipart/form-data "
            'files, a single image with an image/* type, or JSON {"urls": [...]}'
        )
    return uploads


async def _fetch_urls(body: bytes, service: Service) -> list[Image]:
    try:
        asked = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest(
            'the body is not JSON: a JSON body is {"urls": [...]}; send an image as '
            "multipart/form-data or with an image/* Content-Type"
        ) from None
    urls = asked.get("urls") if isinstance(asked, dict) and set(asked) == {"urls"} else None
    limit = service.limits.max_images_per_request
    if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
        raise BadRequest('a JSON body is {"urls": ["https://...", ...]}: a list of URLs, only')
    if not urls:
        raise EmptyUpload("the list of URLs is empty")
    if len(urls) > limit:
        raise BadRequest(f"{len(urls)} URLs, over max_images_per_request={limit}")
    fetched = await service.fetcher.fetch_all(urls)
    return [Image(url, data) for url, data in zip(urls, fetched, strict=True)]


async def _read_raw(request: Request, limits: UploadLimits) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_image_bytes:
            raise _image_too_large("the request body", size, limits.max_image_bytes)
        chunks.append(chunk)
    if not size:
        raise EmptyUpload("the request body is empty (0 bytes)")
    return b"".join(chunks)


async def _read_multipart(request: Request, limits: UploadLimits) -> list[Image]:
    limit = limits.max_images_per_request
    parser = MultiPartParser(request.headers, request.stream(), max_files=limit, max_fields=limit)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Both "Too many files" and "Too many fields" come from this one setting.
        hint = f" (max_images_per_request={limit})" if exc.message.startswith("Too many") else ""
        raise InvalidMultipart(f"cannot parse the multipart body: {exc.message}{hint}") from exc
    try:
        uploads = [await _read_part(name, part, limits) for name, part in form.multi_items()]
    finally:
        await form.close()
    if not uploads:
        raise EmptyUpload("the multipart body has no files")
    return uploads


async def _read_part(name: str, part: UploadFile | str, limits: UploadLimits) -> Image:
    if not isinstance(part, UploadFile):
        raise InvalidMultipart(
            f"form field {name!r} is not a file; send images as file parts (with a filename)"
        )
    if part.size is not None and part.size > limits.max_image_bytes:
        raise _image_too_large(f"file {part.filename!r}", part.size, limits.max_image_bytes)
    data = await part.read()
    if not data:
        raise EmptyUpload(f"file {part.filename!r} is empty (0 bytes)")
    return Image(part.filename, data)


def _image_too_large(what: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} has at least {size} bytes, over max_image_bytes={limit}")
