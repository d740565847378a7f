"""``POST /embed`` and ``POST /explain``: what ``/predict`` takes, through the same pipeline with
another head (app.pipeline.heads): each image's embedding, or its top-k with a heatmap of where
the model saw its class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Query, Request, Response
from starlette.types import Receive, Scope, Send

from app.edge.access import Access, access
from app.edge.requests import MODEL_VERSION_HEADER, unless_disconnected
from app.http.openapi import ERRORS, PREDICT_BODY
from app.http.predict import (
    ModelName,
    ModelVersion,
    TimeoutMs,
    TopK,
    answer,
    plain_query,
    read_uploads,
)
from app.http.schemas import EmbedResponse, ExplainResponse
from app.pipeline.heads import Embed, Explain, Head
from app.pipeline.pipeline import Image
from app.service import Service
from core.contract import ModelMetadata

router = APIRouter()
T = TypeVar("T")

Normalize = Annotated[
    bool,
    Query(description="L2-normalise each embedding (cosine similarity is then a dot product)"),
]
ClassId = Annotated[
    int | None,
    Query(ge=0, description="The class whose heatmap to draw, 0..num_classes-1 (default: the top)"),
]


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERRORS,
    openapi_extra=access(Access.INFERENCE, **PREDICT_BODY),
    summary="Each image's embedding: the pooled features the classifier reads",
)
async def embed(
    request: Request,
    normalize: Normalize = True,
    model: ModelName = None,
    version: ModelVersion = None,
    timeout_ms: TimeoutMs = None,
) -> Response:
    return await _embed(request, request.app.state.service, normalize, model, version)


async def _embed(
    request: Request, service: Service, normalize: bool, model: str | None, version: str | None
) -> Response:
    header, images, vectors = await _answers(
        request, service, model, version, lambda metadata: Embed(normalize)
    )
    results = [
        {"filename": image.name, "embedding": vector}
        for image, vector in zip(images, vectors, strict=True)
    ]
    # orjson writes the float32 arrays itself: a 2048-d vector as a list costs far more.
    body = orjson.dumps(header | {"results": results}, option=orjson.OPT_SERIALIZE_NUMPY)
    return _json(body, header)


@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses=ERRORS,
    openapi_extra=access(Access.INFERENCE, **PREDICT_BODY),
    summary="Top-k per image, and a heatmap (class activation map) of where the model saw a class",
)
async def explain(
    request: Request,
    top_k: TopK = None,
    class_id: ClassId = None,
    model: ModelName = None,
    version: ModelVersion = None,
    timeout_ms: TimeoutMs = None,
) -> Response:
    return await _explain(request, request.app.state.service, top_k, class_id, model, version)


async def _explain(
    request: Request,
    service: Service,
    top_k: int | None,
    class_id: int | None,
    model: str | None,
    version: str | None,
) -> Response:
    header, images, explained = await _answers(
        request,
        service,
        model,
        version,
        lambda metadata: Explain(metadata, top_k, service.default_top_k, class_id),
    )
    results = [
        {
            "filename": image.name,
            "predictions": [p._asdict() for p in answer.predictions],
            "heatmap": answer.heatmap._asdict(),
        }
        for image, answer in zip(images, explained, strict=True)
    ]
    return _json(orjson.dumps(header | {"results": results}), header)


async def _answers(
    request: Request,
    service: Service,
    model: str | None,
    version: str | None,
    head_for: Callable[[ModelMetadata], Head[T]],
) -> tuple[dict[str, Any], list[Image], list[T]]:
    """The answering model's name and version, the request's images, and the head's answer for
    each, as ``/predict`` computes its own (app.http.predict)."""
    with service.route(model, version).hold() as route:
        head = head_for(route.served.metadata)  # a bad parameter is refused before the body
        images = await read_uploads(request, service)
        work = route.images(images, head, head_for)
        answers = await unless_disconnected(request.receive, work)
    served = route.served  # the version that answered
    return {"model_name": served.name, "model_version": served.version}, images, answers


def _json(body: bytes, header: dict[str, Any]) -> Response:
    return Response(
        body, media_type="application/json", headers={MODEL_VERSION_HEADER: header["model_version"]}
    )


async def direct_embed(service: Service, scope: Scope, receive: Receive, send: Send) -> bool:
    """``POST /embed`` from the door, as ``/predict``'s (app.http.predict.direct): False, with
    nothing sent, where the query needs FastAPI's validation to say what is wrong with it."""
    query = plain_query(scope["query_string"], ("normalize", "model", "version"))
    normalize = BOOLEANS.get((query or {}).get("normalize", "true").lower())
    if query is None or normalize is None:
        return False
    request = Request(scope, receive)
    await answer(
        _embed(request, service, normalize, query.get("model"), query.get("version")),
        scope,
        receive,
        send,
    )
    return True


async def direct_explain(service: Service, scope: Scope, receive: Receive, send: Send) -> bool:
    """``POST /explain`` from the door, as ``direct_embed``."""
    query = plain_query(scope["query_string"], ("top_k", "class_id", "model", "version"))
    if query is None:
        return False
    top_k, class_id = query.get("top_k"), query.get("class_id")
    if not all(v is None or (v.isascii() and v.isdigit()) for v in (top_k, class_id)):
        return False
    if top_k is not None and int(top_k) < 1:
        return False
    request = Request(scope, receive)
    work = _explain(
        request,
        service,
        None if top_k is None else int(top_k),
        None if class_id is None else int(class_id),
        query.get("model"),
        query.get("version"),
    )
    await answer(work, scope, receive, send)
    return True


# What FastAPI's bool query accepts, each way.
BOOLEANS = {
    **dict.fromkeys(("true", "1", "yes", "on"), True),
    **dict.fromkeys(("false", "0", "no", "off"), False),
}
