"""Rollouts over REST, beside the repository extension (docs/rollouts.md): start one
(``PUT``), read its state (``GET``), promote the candidate (``POST .../promote``) or stop it with
the baseline serving (``DELETE``). Guarded by the repository keys like loads and unloads; with
several workers, every worker applies the change before the answer (app.repository.link).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.oip.protocol import ProtocolError
from app.oip.rest import REPOSITORY, inlined
from app.repository.requests import RolloutRequest
from app.repository.rollout import Status
from app.repository.sources import check_name
from app.service import Service
from core.errors import BadRequest

router = APIRouter(
    prefix="/v2/repository/models/{model_name}/rollout",
    tags=["Open Inference Protocol: model repository"],
    responses={status: {"model": ProtocolError} for status in (400, 401, 403, 404, 409)},
)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


@router.put(
    "",
    openapi_extra=REPOSITORY
    | {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inlined(RolloutRequest.model_json_schema())}
            },
        }
    },
    summary="Start a rollout of a candidate version beside the one serving (canary or shadow)",
)
async def start(model_name: str, request: Request) -> dict[str, Any]:
    try:
        asked = RolloutRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        where = f"{where}: " if where else ""
        message = error["msg"].removeprefix("Value error, ")
        raise BadRequest(f"invalid rollout: {where}{message}") from None
    return await _service(request).start_rollout(check_name(model_name), asked)


@router.get("", openapi_extra=REPOSITORY, summary="The model's rollout: its plan, figures, status")
async def state(model_name: str, request: Request) -> dict[str, Any]:
    return await _service(request).rollout_state(check_name(model_name))


@router.post(
    "/promote",
    openapi_extra=REPOSITORY,
    summary="Make the candidate the served version (the baseline is unloaded)",
)
async def promote(model_name: str, request: Request) -> dict[str, Any]:
    return await _service(request).end_rollout(check_name(model_name), Status.PROMOTED)


@router.delete(
    "",
    openapi_extra=REPOSITORY,
    summary="Stop the rollout: the baseline serves, the candidate is unloaded",
)
async def stop(model_name: str, request: Request) -> dict[str, Any]:
    return await _service(request).end_rollout(check_name(model_name), Status.STOPPED)
