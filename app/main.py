"""The application factory: ``create_app(settings)``. Importing this module loads nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from app.batcher import BatchConfig, Batcher
from app.handlers import install_error_handlers
from app.metrics import Metrics
from app.middleware import RequestContext
from app.routes import router
from app.session import OnnxModel
from app.settings import Settings
from app.state import Lifecycle

log = logging.getLogger(__name__)


def create_app(settings: Settings, model: OnnxModel | None = None) -> FastAPI:
    """``model``: an already opened session (``python -m app`` opens it first to fail fast)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model or OnnxModel.load(settings)
        name, version = loaded.info.name, loaded.info.version
        metrics.model.info({"name": name, "version": version, "provider": loaded.provider})
        app.state.model = loaded
        app.state.lifecycle = lifecycle = Lifecycle(settings.max_inflight_requests)
        app.state.batcher = batcher = Batcher(loaded.predict, _batch_config(settings), metrics)
        app.state.decoder = decoder = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="decode"
        )
        batcher.start()
        warm_up = asyncio.create_task(_warm_up(loaded, batcher, lifecycle, settings.max_batch_size))
        try:
            yield
        finally:
            lifecycle.draining = True
            await asyncio.gather(warm_up, return_exceptions=True)
            await batcher.drain()
            decoder.shutdown(wait=True)
            log.info("drained")

    app = FastAPI(title="resnet-serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(
        RequestContext, metrics=metrics, max_request_bytes=settings.max_request_bytes
    )
    return app


def _batch_config(settings: Settings) -> BatchConfig:
    return BatchConfig(
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue_images=settings.max_queue_images,
        request_timeout_ms=settings.request_timeout_ms,
    )


async def _warm_up(
    model: OnnxModel, batcher: Batcher, lifecycle: Lifecycle, max_batch_size: int
) -> None:
    # Batches are not padded, so every size 1..max_batch_size can occur and each is warmed.
    sizes = list(range(1, max_batch_size + 1))
    log.info("warming up", extra={"batch_sizes": sizes})
    try:
        await batcher.run_in_model_thread(partial(model.warm_up, sizes))
    except Exception:
        log.exception("warm-up failed; the server stays unready")
        return
    lifecycle.mark_warmed(sizes)
    log.info("ready", extra={"provider": model.provider})
