"""The application factory: ``create_app(settings)``. Importing this module loads nothing.

Each component gets a narrow config built here (or in app.repository.configs), once, from ``Settings``
(where the defaults live).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI

from app.batching.admission import Admission, AdmissionConfig, Lifecycle
from app.batching.fair import FairExecutor
from app.edge.keys import KeyFile
from app.grpc import server as grpc_serving
from app.http.auth import RequireKey
from app.http.context import RequestContext, RequestLog
from app.http.docs import install_docs
from app.http.handlers import install_error_handlers
from app.http.intake import Intake
from app.http.page import install_page
from app.http.routes import router
from app.http.routing import RouteTable
from app.http.schema_bounds import install_schema_bounds
from app.http.uploads import UploadLimits
from app.oip.repository import router as repository_router
from app.oip.rest import router as oip_router
from app.repository.configs import session_config
from app.repository.link import Change, Outcome, WorkerLink
from app.repository.models import Models, Source
from app.repository.policy import VersionPolicy
from app.repository.sources import FileSource, RepositorySource
from app.repository.version import Opener
from app.runtimes.base import Backend
from app.runtimes.registry import check_model, open_model
from app.settings import Settings
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import configure as configure_tracing

log = logging.getLogger(__name__)


def admission_config(settings: Settings) -> AdmissionConfig:
    return AdmissionConfig(
        request_timeout_ms=settings.request_timeout_ms,
        admission_wait_ms=settings.admission_wait_ms,
        max_buffered_bytes=settings.max_buffered_bytes,
    )


def key_files(settings: Settings) -> dict[str, KeyFile]:
    """The configured key sets by name, each read now (raises KeyFileError)."""
    paths = {
        "api": settings.api_keys_file,
        "metrics": settings.metrics_api_keys_file,
        "repository": settings.repository_api_keys_file,
    }
    return {name: KeyFile(path, name) for name, path in paths.items() if path is not None}


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle = Lifecycle(settings.retry_after_s)
        admission = Admission(admission_config(settings), lifecycle, metrics)
        decoder = FairExecutor(settings.decode_threads, "decode")
        versions = Opener(settings, cores, admission, decoder, metrics, lifecycle, tracing, model)
        models = Models(source(settings), versions.open, metrics)
        models.default_name = settings.default_model
        app.state.lifecycle = lifecycle
        app.state.admission = admission
        app.state.models = models
        link: WorkerLink | None = getattr(app.state, "link", None)

        async def change_repository(change: Change) -> list[Outcome]:
            if link is None:
                return [Outcome(None, failed=await models.apply(change))]
            return await link.relay(change)  # every worker applies it

        app.state.change_repository = change_repository
        warming = asyncio.create_task(_first_load(models, lifecycle, link))
        watching = (
            asyncio.create_task(_watch(models, settings.repository_poll_s))
            if settings.repository_poll_s
            else None
        )
        sampler = asyncio.create_task(metrics.sample_forever()) if metrics.multiprocess else None
        grpc_server = None
        try:
            if settings.workers > 1:
                # uvicorn listens only once the lifespan has started: until this worker is
                # warm, the kernel gives the port's connections to the other workers.
                await warming
                if not lifecycle.warmed:
                    raise RuntimeError("no model is ready; this worker will not serve")
            if settings.grpc_port:
                grpc_server = await grpc_serving.start(app, settings)
            yield
        finally:
            lifecycle.draining = True
            if grpc_server is not None:  # calls in flight finish; new ones are refused
                await grpc_serving.stop(grpc_server, settings.shutdown_timeout_s)
            for task in (watching, sampler):
                if task is not None:
                    task.cancel()
            await asyncio.gather(warming, return_exceptions=True)
            await models.close()
            decoder.shutdown(wait=True)
            versions.close()
            if sampler is not None:
                metrics.sample()
            tracing.shutdown()  # what was traced is sent before the process goes
            log.info("drained")

    app = FastAPI(
        title="resnet-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.state.key_files = keys
    app.state.upload_limits = UploadLimits(
        max_image_bytes=settings.max_image_bytes,
        max_images_per_request=settings.max_images_per_request,
    )
    install_error_handlers(app)
    routes = RouteTable(app)
    routes.include(app, router)
    routes.include(app, oip_router)
    routes.include(app, repository_router)
    install_page(app, routes)
    install_docs(app, routes)
    install_schema_bounds(app, settings.max_images_per_request, settings.default_top_k)
    # The last added is outermost: the request context matches the route (its declared access,
    # app.http.routing) and sees the intake's refusals; keys are checked before the intake admits
    # a request or reads its body.
    app.add_middleware(
        Intake,
        max_request_bytes=settings.max_request_bytes,
        upload_timeout_ms=settings.upload_timeout_ms,
    )
    app.add_middleware(RequireKey, keys=keys, metrics=metrics)
    app.state.request_log = requests = RequestLog(metrics)
    app.add_middleware(
        RequestContext, metrics=metrics, routes=routes, tracing=tracing, requests=requests
    )
    app.state.routes = routes
    app.state.reloads_on_sighup = bool(keys) or settings.model_repository is not None
    return app


def source(settings: Settings) -> Source:
    """Where the model versions come from: the repository folder, or the one file."""
    if settings.model_repository is not None:
        return RepositorySource(
            settings.model_repository, VersionPolicy.parse(settings.version_policy)
        )
    check = session_config(settings)
    return FileSource(
        settings.model_path,
        lambda path: check_model(replace(check, model_path=path)),
    )


async def _first_load(models: Models, lifecycle: Lifecycle, link: WorkerLink | None) -> None:
    """Every model to its policy, then (a worker) the repository changes the other workers
    applied; ready once a model is (each failure is logged and indexed)."""
    await models.load_all()
    if link is not None:
        await link.attach(models.apply)
    if models.ready():
        lifecycle.mark_warmed(sorted({b for s in models.ready() for b in s.batcher.config.buckets}))
    else:
        log.error("no model version is ready; the server stays unready")


async def _watch(models: Models, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await models.load_all(polled=True)
        except Exception:  # the next look may succeed: a poll never stops for good
            log.exception("polling the model repository failed")


def open_app(settings: Settings, cores: int | None = None) -> FastAPI:
    """The app built, and ``model_path`` opened first where it is served: a worker's whole
    set-up (raises ModelError and KeyFileError with one line for the operator)."""
    if settings.model_repository is not None:
        source(settings)  # the repository is there, or one line now
        return create_app(settings, cores=cores)
    return create_app(settings, open_model(session_config(settings, cores)), cores=cores)
