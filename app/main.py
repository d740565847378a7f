"""The application factory: ``create_app(settings)``. Importing this module loads nothing.

Each component gets a narrow config built here, once, from ``Settings`` (where the defaults live).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from app.admission import Admission, AdmissionConfig
from app.auth import RequireKey
from app.batch_limit import fit_batch_limit, timed_sizes
from app.batcher import BatchConfig, Batcher
from app.cpus import cpu_share
from app.docs import install_docs
from app.handlers import install_error_handlers
from app.intake import Intake
from app.keys import KeyFile
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.middleware import RequestContext
from app.oip.routes import router as oip_router
from app.page import install_page
from app.providers import CPU, CUDA, GPU, GpuOptions, default_trt_cache_dir
from app.routes import router
from app.schema_bounds import install_schema_bounds
from app.service import Classifier, ClassifyConfig
from app.session import OnnxModel, SessionConfig
from app.settings import MAX_LANES, Settings
from app.uploads import UploadLimits

log = logging.getLogger(__name__)


def concurrent_batches(settings: Settings, provider: str) -> int:
    if settings.concurrent_batches:
        return settings.concurrent_batches
    return 1 if provider in GPU else min(MAX_LANES, cpu_share(settings.workers))


def intra_op_threads(settings: Settings) -> int:
    """Threads of one run: the share of the cores each CPU lane may count on. Chosen before
    the provider is known; on a GPU they only run the few operators left on the CPU."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    return max(1, cpu_share(settings.workers) // concurrent_batches(settings, CPU))


def alone_threads(settings: Settings) -> int:
    """Threads of the session for a batch alone on the machine (ort_spinning=adaptive): all
    the lanes' threads together, as the lone batch has their cores to itself."""
    return intra_op_threads(settings) * concurrent_batches(settings, CPU)


def session_config(settings: Settings) -> SessionConfig:
    buckets = batch_buckets(settings, CUDA)
    return SessionConfig(
        model_path=settings.model_path,
        providers=settings.providers,
        precision=settings.model_precision,
        intra_op_threads=intra_op_threads(settings),
        alone_threads=alone_threads(settings),
        spinning=settings.ort_spinning,
        graph_optimization=settings.graph_optimization,
        gpu=GpuOptions(
            cuda_graphs=settings.cuda_graphs,
            conv_algo_search=settings.cuda_conv_algo_search,
            prefer_nhwc=settings.cuda_prefer_nhwc,
            trt_cache_dir=settings.trt_cache_dir or default_trt_cache_dir(settings.model_path),
            batch_range=(buckets[0], buckets[-1]),
        ),
    )


def batch_buckets(settings: Settings, provider: str) -> tuple[int, ...]:
    if settings.batch_buckets is not None:
        return settings.batch_buckets
    largest = settings.max_batch_size
    if provider in GPU:
        powers = (2**i for i in range(largest.bit_length()))
        return (*(size for size in powers if size < largest), largest)
    return tuple(range(1, largest + 1))


def batch_config(settings: Settings, provider: str) -> BatchConfig:
    return BatchConfig(
        max_batch_size=settings.max_batch_size,
        buckets=batch_buckets(settings, provider),
        max_wait_ms=settings.max_wait_ms,
        max_queue_images=settings.max_queue_images,
        request_timeout_ms=settings.request_timeout_ms,
        retry_after_s=settings.retry_after_s,
        concurrent_batches=concurrent_batches(settings, provider),
        inline_max_ms=settings.inline_max_ms,
        flat_batch_ms=settings.flat_batch_ms,
    )


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
        inline_max_ms=settings.inline_max_ms,
    )


def key_files(settings: Settings) -> dict[str, KeyFile]:
    """The configured key sets by name, each read now (raises KeyFileError)."""
    paths = {"api": settings.api_keys_file, "metrics": settings.metrics_api_keys_file}
    return {name: KeyFile(path, name) for name, path in paths.items() if path is not None}


def create_app(settings: Settings, model: OnnxModel | None = None) -> FastAPI:
    """``model``: an already opened session (``python -m app`` opens it first to fail fast).

    Raises KeyFileError for a configured key file that cannot be used.
    """
    keys = key_files(settings)
    metrics = Metrics(multiprocess=settings.workers > 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model or OnnxModel.load(session_config(settings))
        meta = loaded.metadata
        metrics.model.info(
            {"name": meta.name, "version": meta.version, "provider": loaded.provider}
        )
        lifecycle = Lifecycle(settings.retry_after_s)
        admission = Admission(admission_config(settings), lifecycle, metrics)
        batcher = Batcher(
            loaded.predict,
            batch_config(settings, loaded.provider),
            metrics,
            lifecycle.fail,
            admission.observe_batch,
            loaded.predict_alone if loaded.adaptive else None,
            lambda: admission.admitted_images,
        )
        decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        app.state.lifecycle = lifecycle
        app.state.admission = admission
        app.state.classifier = Classifier(
            loaded, batcher, decoder, admission, metrics, classify_config(settings)
        )
        loaded.bind(batcher.config.buckets)
        batcher.start()
        warm_up = asyncio.create_task(_warm_up(loaded, batcher, admission))
        sampler = asyncio.create_task(metrics.sample_forever()) if metrics.multiprocess else None
        try:
            if settings.workers > 1:
                # uvicorn listens only once the lifespan has started: until this worker is
                # warm, the kernel gives the port's connections to the other workers.
                await warm_up
                if not lifecycle.warmed:
                    raise RuntimeError("warm-up failed; this worker will not serve")
            yield
        finally:
            lifecycle.draining = True
            await asyncio.gather(warm_up, return_exceptions=True)
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
    app.include_router(router)
    app.include_router(oip_router)
    install_page(app)
    install_docs(app)
    install_schema_bounds(app, settings.max_images_per_request, settings.default_top_k)
    # The last added is outermost: the request context sees (and counts) the intake's refusals;
    # keys are checked before the intake admits a request or reads its body.
    app.add_middleware(
        Intake,
        max_request_bytes=settings.max_request_bytes,
        upload_timeout_ms=settings.upload_timeout_ms,
    )
    app.add_middleware(
        RequireKey, api_keys=keys.get("api"), metrics_keys=keys.get("metrics"), metrics=metrics
    )
    app.add_middleware(RequestContext, metrics=metrics)
    return app


async def _warm_up(model: OnnxModel, batcher: Batcher, admission: Admission) -> None:
    # Every bucket is a shape the model will see: each is warmed before readiness.
    sizes = list(batcher.config.buckets)
    log.info("warming up", extra={"batch_sizes": sizes})
    try:
        lanes = batcher.config.concurrent_batches
        if model.warms_per_thread:  # one after another: each captures its own CUDA graphs
            await batcher.run_on_lanes([partial(model.warm_up, sizes)] * lanes, at_once=False)
        else:  # the lanes share the buckets out and warm the session at once
            work = [partial(model.warm_up, sizes[lane::lanes]) for lane in range(lanes)]
            await batcher.run_on_lanes(work, at_once=True)
        await batcher.run_in_model_thread(partial(model.warm_up_alone, sizes))
        # Timed on every lane at once, as under load: the batch limit, and admission's first
        # estimate of the cost per image.
        timed = timed_sizes(sizes)
        runs = await batcher.run_on_lanes([partial(model.time_runs, timed)] * lanes, at_once=True)
        seconds = {size: statistics.median(run[size] for run in runs) for size in timed}
        batcher.limit = fit_batch_limit(seconds, batcher.config.flat_batch_ms)
        admission.observe_batch(batcher.limit, seconds[batcher.limit] / lanes)
    except Exception:
        log.exception("warm-up failed; the server stays unready")
        return
    admission.lifecycle.mark_warmed(sizes)
    log.info(
        "ready",
        extra={
            "provider": model.provider,
            "batch_limit": batcher.limit,
            "batch_ms": {size: round(s * 1000, 1) for size, s in seconds.items()},
        },
    )
