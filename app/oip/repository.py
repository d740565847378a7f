"""The protocol's model repository extension: the index, load and unload (Triton's and MLServer's
``/v2/repository`` routes; ``tritonclient``'s ``get_model_repository_index``, ``load_model`` and
``unload_model`` work unchanged). Guarded by the repository keys (app.http.auth).

A load brings the model to its version policy: the server's, or Triton's ``version_policy`` in
the request's ``config`` parameter (kept for that model until a load without one). It answers once
the new versions serve, or 400 naming each version that failed while the old ones keep serving.
With several workers, every worker applies the change before the answer (app.repository.link).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError

from app.http.deps import ChangeRepository, ModelsDep, RepositoryChangesDep
from app.http.routing import Access, access
from app.oip.protocol import ProtocolError
from app.repository.link import Change, raise_refusal
from app.repository.models import Models
from app.repository.policy import VersionPolicy
from app.repository.sources import check_name
from core.errors import BadRequest

router = APIRouter(
    prefix="/v2/repository",
    tags=["Open Inference Protocol: model repository"],
    responses={status: {"model": ProtocolError} for status in (400, 401, 403, 404)},
)
REPOSITORY = access(Access.REPOSITORY)


class IndexRequest(BaseModel):
    ready: bool = False


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str


class ControlRequest(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict)


@router.post(
    "/index",
    response_model=list[IndexEntry],
    openapi_extra=REPOSITORY,
    summary="Every model and version, with its state",
)
async def index(request: Request, models: ModelsDep) -> list[IndexEntry]:
    wanted = await _body(request, IndexRequest)
    entries = models.index()
    return [
        IndexEntry(name=e.name, version=e.version, state=e.state.value, reason=e.reason)
        for e in entries
        if not wanted.ready or e.state == "READY"
    ]


@router.post(
    "/models/{model_name}/load",
    response_class=Response,
    openapi_extra=REPOSITORY,
    summary="Load the model to its version policy (200 once its new versions serve)",
)
async def load(
    model_name: str, request: Request, models: ModelsDep, change: RepositoryChangesDep
) -> Response:
    control = await _body(request, ControlRequest)
    policy = policy_from_config(control.parameters.get("config"))
    await load_model(change, models, check_name(model_name), policy)
    return Response()


@router.post(
    "/models/{model_name}/unload",
    response_class=Response,
    openapi_extra=REPOSITORY,
    summary="Unload every version of the model (200 once they have answered what they held)",
)
async def unload(model_name: str, request: Request, change: RepositoryChangesDep) -> Response:
    await _body(request, ControlRequest)
    await unload_model(change, check_name(model_name))
    return Response()


async def load_model(
    change: ChangeRepository, models: Models, name: str, policy: VersionPolicy | None
) -> None:
    """Every worker brings ``name`` to ``policy``; BadRequest names each version that failed
    (the ones serving go on)."""
    outcomes = await change(Change("load", name, str(policy) if policy is not None else None))
    raise_refusal(outcomes)
    failed = sorted({failure for outcome in outcomes for failure in outcome.failed})
    if failed:
        reasons = "; ".join(f"version {version}: {reason}" for version, reason in failed)
        raise BadRequest(f"failed to load {name!r} ({reasons}); serving {models.versions(name)}")


async def unload_model(change: ChangeRepository, name: str) -> None:
    raise_refusal(await change(Change("unload", name)))


M = TypeVar("M", bound=BaseModel)


async def _body(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body) if body.strip() else model()
    except ValidationError as exc:
        raise BadRequest(f"invalid request: {exc.errors()[0]['msg']}") from None


def policy_from_config(config: Any) -> VersionPolicy | None:
    """Triton's model config (a JSON string): only its ``version_policy`` means anything here."""
    if config is None:
        return None
    try:
        parsed = json.loads(config) if isinstance(config, str) else None
        policy = parsed.get("version_policy") if isinstance(parsed, dict) else None
    except ValueError:
        policy = None
    return _triton_policy(policy)


def _triton_policy(policy: Any) -> VersionPolicy:
    try:
        return _parsed_policy(policy)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _parsed_policy(policy: Any) -> VersionPolicy:
    if policy is None:
        raise BadRequest(
            'parameters.config must be a JSON object string with a "version_policy", e.g. '
            '{"version_policy": {"specific": {"versions": [1]}}}'
        )
    if isinstance(policy, dict) and len(policy) == 1:
        ((kind, rule),) = policy.items()
        if kind == "all" and rule in ({}, None):
            return VersionPolicy("all")
        if kind == "latest" and isinstance(rule, dict):
            return VersionPolicy.parse(f"latest:{rule.get('num_versions', 1)}")
        if kind == "specific" and isinstance(rule, dict) and rule.get("versions"):
            versions = ",".join(str(v) for v in rule["versions"])
            return VersionPolicy.parse(f"specific:{versions}")
    raise BadRequest(f"version_policy {json.dumps(policy)} is not latest, all or specific")
