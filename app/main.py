"""The application factory: ``create_app(settings)``. Importing this module loads nothing.

Each component gets a narrow config built here (or in app.engine.sizing), once, from ``Settings``
(where the defaults live).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.engine.admission import Admission, AdmissionConfig
from app.engine.batcher import Batcher
from app.engine.classifier import Classifier, ClassifyConfig
from app.engine.lifecycle import Lifecycle
from app.engine.session import OnnxModel
from app.engine.sizing import batch_config, session_config
from app.engine.warmup import warm_up
from app.http.access import RouteTable
from app.http.auth import RequireKey
from app.http.context import RequestContext
from app.http.docs import install_docs
from app.http.handlers import install_error_handlers
from app.http.intake import Intake
from app.http.page import install_page
from app.http.routes import router
from app.http.schema_bounds import install_schema_bounds
from app.http.uploads import UploadLimits
from app.oip.routes import router as oip_router
from app.process.keys import KeyFile
from app.process.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)


def admission_config(settings: Settings) -> AdmissionConfig:
    return AdmissionConfig(
        request_timeout_ms=settings.request_timeout_ms,
        admission_wait_ms=settings.admission_wait_ms,
        max_buffered_bytes=settings.max_buffered_bytes,
    )


def classify_config(settings: Settings) -> ClassifyConfig:
    return ClassifyConfig(
        default_top_k=settings.default_top_k,
        limits=settings.limits,
        max_request_pixels=settings.max_request_pixels,
        request_timeout_ms=settings.request_timeout_ms,
    )


def key_files(settings: Settings) -> dict[str, KeyFile]:
    """The configured key sets by name, each read now (raises KeyFileError)."""
    paths = {"api": settings.api_keys_file, "metrics": settings.metrics_api_keys_file}
    return {name: KeyFile(path, name) for name, path in paths.items() if path is not None}


def create_app(
    settings: Settings, model: OnnxModel | None = None, *, cores: int | None = None
) -> FastAPI:
    """``model``: an already opened session (``python -m app`` opens it first to fail fast).
    ``cores``: this worker's own cores when it is pinned to them (app.engine.sizing).

    Raises KeyFileError for a configured key file that cannot be used.
    """
    keys = key_files(settings)
    metrics = Metrics(multiprocess=settings.workers > 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model or OnnxModel.load(session_config(settings, cores))
        meta = loaded.metadata
        metrics.model.info(
            {"name": meta.name, "version": meta.version, "provider": loaded.provider}
        )
        lifecycle = Lifecycle(settings.retry_after_s)
        admission = Admission(admission_config(settings), lifecycle, metrics)
        batcher = Batcher(
            loaded.predict,
            batch_config(settings, loaded.provider, cores),
            metrics,
            on_failure=lifecycle.fail,
            on_batch=admission.observe_batch,
            alone_fn=loaded.predict_alone if loaded.adaptive else None,
            admitted_images=lambda: admission.admitted_images,
        )
        decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        app.state.lifecycle = lifecycle
        app.state.admission = admission
        app.state.classifier = Classifier(
            loaded, batcher, decoder, admission, metrics, classify_config(settings)
        )
        loaded.bind(batcher.config.buckets)
        batcher.start()
        warming = asyncio.create_task(warm_up(loaded, batcher, admission))
        sampler = asyncio.create_task(metrics.sample_forever()) if metrics.multiprocess else None
        try:
            if settings.workers > 1:
                # uvicorn listens only once the lifespan has started: until this worker is
                # warm, the kernel gives the port's connections to the other workers.
                await warming
                if not lifecycle.warmed:
                    raise RuntimeError("warm-up failed; this worker will not serve")
            yield
        finally:
            lifecycle.draining = True
            await asyncio.gather(warming, return_exceptions=True)
            await batcher.drain()
            decoder.shutdown(wait=True)
            if sampler is not None:
                sampler.cancel()
                metrics.sample()
            log.info("drained")

    app = FastAPI(
        title="resnet-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.metrics = metrics
    app.state.key_files = keys
    app.state.upload_limits = UploadLimits(
        max_image_bytes=settings.max_image_bytes,
        max_images_per_request=settings.max_images_per_request,
    )
    install_error_handlers(app)
    routes = RouteTable(app)
    routes.include(app, router)
    routes.include(app, oip_router)
    install_page(app, routes)
    install_docs(app, routes)
    install_schema_bounds(app, settings.max_images_per_request, settings.default_top_k)
    # The last added is outermost: the request context matches the route (its declared access,
    # app.http.access) and sees the intake's refusals; keys are checked before the intake admits
    # a request or reads its body.
    app.add_middleware(
        Intake,
        max_request_bytes=settings.max_request_bytes,
        upload_timeout_ms=settings.upload_timeout_ms,
    )
    app.add_middleware(
        RequireKey, api_keys=keys.get("api"), metrics_keys=keys.get("metrics"), metrics=metrics
    )
    app.add_middleware(RequestContext, metrics=metrics, routes=routes)
    app.state.routes = routes
    return app


def open_app(settings: Settings, cores: int | None = None) -> FastAPI:
    """The model opened and the app built: a worker's whole set-up (raises ModelError and
    KeyFileError with one line for the operator)."""
    return create_app(settings, OnnxModel.load(session_config(settings, cores)), cores=cores)
