"""One JSON error shape for every failure: ours, FastAPI's validation, Starlette's 404/405.

Under ``/v2`` the Open Inference Protocol's shape, ``{"error": "..."}``, replaces ours: its
clients (tritonclient, kserve) read exactly that.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.telemetry.logs import request_id
from core.errors import ServiceError

log = logging.getLogger(__name__)


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    body: dict[str, Any] = {
        "error": {"code": code, "message": message, "request_id": request_id.get() or "-"}
    }
    if is_protocol_path(path):
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def is_protocol_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return service_error(exc, request.url.path)


def service_error(exc: ServiceError, path: str) -> JSONResponse:
    """The answer to a ServiceError raised while serving ``path``."""
    # Only our own faults: 503/504 are load, counted in metrics, and at overload a line each
    # would cost the loop as much as serving.
    if exc.status_code == 500:
        log.warning("request failed", extra={"code": exc.code, "detail": exc.message})
    return error_response(exc.status_code, exc.code, exc.message, exc.headers, path=path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = HTTPStatus(exc.status_code)
    code = status.phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if exc.detail != status.phrase else _describe(request, status)
    return error_response(
        exc.status_code, code, message, dict(exc.headers or {}), path=request.url.path
    )


def _describe(request: Request, status: HTTPStatus) -> str:
    if status is HTTPStatus.NOT_FOUND:
        return f"no such path: {request.url.path}"
    if status is HTTPStatus.METHOD_NOT_ALLOWED:
        return f"method {request.method} is not allowed on {request.url.path}"
    return status.phrase


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = "; ".join(_describe_validation(error) for error in exc.errors())
    return error_response(422, "invalid_parameter", message, path=request.url.path)


def _describe_validation(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()))
    text = f"{where}: {error.get('msg', 'invalid')}"
    if "input" in error:
        text += f" (got {error['input']!r})"
    return text


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
