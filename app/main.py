"""The application factory: ``create_app(settings)``. Importing this module loads nothing.

It wires the transports (HTTP, the Open Inference Protocol over REST, gRPC) to the one service
they serve from (app.service), each component configured once from ``Settings`` (where the
defaults live).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.edge.access import key_files
from app.grpc import server as grpc_serving
from app.http.docs import install_docs
from app.http.embed import direct_embed, direct_explain
from app.http.embed import router as embed_router
from app.http.handlers import install_error_handlers
from app.http.middleware import Door
from app.http.page import install_page
from app.http.predict import direct as direct_predict
from app.http.predict import router as predict_router
from app.http.routes import router
from app.http.routing import RouteTable
from app.http.schema_bounds import install_schema_bounds
from app.oip.rest import repository as repository_router
from app.oip.rest import router as oip_router
from app.oip.rollouts import router as rollouts_router
from app.repository.configs import runtime_config
from app.repository.sources import source
from app.runtimes.base import Backend
from app.runtimes.registry import open_model
from app.service import NAME, VERSION, Service
from app.settings import Settings
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import configure as configure_tracing


def create_app(
    settings: Settings, model: Backend | None = None, *, cores: int | None = None
) -> FastAPI:
    """``model``: ``model_path`` already opened (``python -m app`` opens it first to fail fast).
    ``cores``: this worker's own cores when it is pinned to them (app.repository.configs).

    Raises KeyFileError for a configured key file that cannot be used.
    """
    keys = key_files(settings)
    metrics = Metrics(multiprocess=settings.workers > 1)
    tracing = configure_tracing(settings, metrics.trace_spans_dropped)
    service = Service(settings, metrics, tracing, keys, model, cores)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.running():
            grpc_server = (
                await grpc_serving.start(service, settings) if settings.grpc_port else None
            )
            try:
                yield
            finally:
                service.stop_admitting()
                if grpc_server is not None:  # calls in flight finish; new ones are refused
                    await grpc_serving.stop(grpc_server, settings.shutdown_timeout_s)

    app = FastAPI(title=NAME, version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)
    routes = RouteTable(app)
    for each in (
        predict_router,
        embed_router,
        router,
        oip_router,
        repository_router,
        rollouts_router,
    ):
        routes.include(app, each)
    install_page(app, routes)
    install_docs(app, routes)
    install_schema_bounds(app, settings.max_images_per_request, settings.default_top_k)
    app.add_middleware(
        Door,
        service=service,
        routes=routes,
        max_request_bytes=settings.max_request_bytes,
        upload_timeout_ms=settings.upload_timeout_ms,
        direct={
            ("POST", "/predict"): direct_predict,
            ("POST", "/embed"): direct_embed,
            ("POST", "/explain"): direct_explain,
        },
    )
    app.state.routes = routes
    return app


def open_app(settings: Settings, cores: int | None = None) -> FastAPI:
    """The app built, and ``model_path`` opened first where it is served: a worker's whole
    set-up (raises ModelError and KeyFileError with one line for the operator)."""
    if settings.model_repository is not None:
        source(settings)  # the repository is there, or one line now
        return create_app(settings, cores=cores)
    model = open_model(runtime_config(settings, cores), settings.memory_budget_mib)
    return create_app(settings, model, cores=cores)
