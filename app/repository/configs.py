"""What serves a model version, configured once from ``Settings`` (where the defaults live): the
runtime's session, the batcher, the pipeline and admission; and how one worker uses its share of
the cores for them: lanes, threads per run, batch buckets.

Each choice is made for the provider that runs it: the session's threads for the provider it is
opened for (the first one the ``providers`` setting accepts that is installed), the batcher's lanes
and buckets for the provider the session actually got. ``cores`` is this worker's share
(``app.process.cpus.cpu_share``, or the cores a pinned worker owns), passed in, never looked up
behind the caller's back.
"""

from __future__ import annotations

import onnxruntime as ort

from app.batching.admission import AdmissionConfig
from app.batching.batcher import BatchConfig
from app.pipeline.pipeline import PipelineConfig
from app.process.cpus import cpu_share
from app.runtimes.config import OrtOptions, RuntimeConfig
from app.runtimes.providers import CPU, GPU, GpuOptions, default_trt_cache_dir, plan_providers
from app.settings import MAX_LANES, Settings


def worker_cores(settings: Settings, cores: int | None = None) -> int:
    """``cores`` when given (a pinned worker's own), else the usable cores split evenly."""
    return cores if cores is not None else cpu_share(settings.workers)


def concurrent_batches(settings: Settings, provider: str, cores: int | None = None) -> int:
    if settings.concurrent_batches:
        return settings.concurrent_batches
    return 1 if provider in GPU else min(MAX_LANES, worker_cores(settings, cores))


def intra_op_threads(settings: Settings, provider: str = CPU, cores: int | None = None) -> int:
    """Threads of one run: the share of the cores each lane may count on. On a GPU they only
    run the few operators left on the CPU."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    lanes = concurrent_batches(settings, provider, cores)
    return max(1, worker_cores(settings, cores) // lanes)


def alone_threads(settings: Settings, cores: int | None = None) -> int:
    """Threads of the CPU session for a batch alone on the machine (ort_spinning=adaptive): all
    the lanes' threads together, as the lone batch has their cores to itself."""
    return intra_op_threads(settings, CPU, cores) * concurrent_batches(settings, CPU, cores)


def batch_buckets(settings: Settings, provider: str) -> tuple[int, ...]:
    if settings.batch_buckets is not None:
        return settings.batch_buckets
    largest = settings.max_batch_size
    if provider in GPU:
        powers = (2**i for i in range(largest.bit_length()))
        return (*(size for size in powers if size < largest), largest)
    return tuple(range(1, largest + 1))


def runtime_config(settings: Settings, cores: int | None = None) -> RuntimeConfig:
    """What a model version's runtime is opened with; its execution providers planned here,
    once (the first one the setting accepts that is installed sizes the lanes and threads)."""
    providers = plan_providers(settings.providers, ort.get_available_providers())
    provider = providers.first
    buckets = batch_buckets(settings, provider)
    return RuntimeConfig(
        model_path=settings.model_path,
        backend=settings.backend,
        precision=settings.model_precision,
        bf16=settings.bf16,
        providers=providers,
        lanes=concurrent_batches(settings, provider, cores),
        intra_op_threads=intra_op_threads(settings, provider, cores),
        alone_threads=alone_threads(settings, cores),
        buckets=buckets,
        reference_check=settings.reference_check,
        tuning=settings.tuning,
        tuning_cache_dir=settings.tuning_cache_dir,
        onnxruntime=OrtOptions(
            spinning=settings.ort_spinning,
            graph_optimization=settings.graph_optimization,
            gpu=GpuOptions(
                cuda_graphs=settings.cuda_graphs,
                conv_algo_search=settings.cuda_conv_algo_search,
                prefer_nhwc=settings.cuda_prefer_nhwc,
                trt_cache_dir=settings.trt_cache_dir or default_trt_cache_dir(settings.model_path),
                batch_range=(buckets[0], buckets[-1]),
            ),
        ),
    )


def batch_config(settings: Settings, provider: str, cores: int | None = None) -> BatchConfig:
    return BatchConfig(
        max_batch_size=settings.max_batch_size,
        buckets=batch_buckets(settings, provider),
        max_wait_ms=settings.max_wait_ms,
        max_queue_images=settings.max_queue_images,
        request_timeout_ms=settings.request_timeout_ms,
        retry_after_s=settings.retry_after_s,
        concurrent_batches=concurrent_batches(settings, provider, cores),
        inline_max_ms=settings.inline_max_ms,
        flat_batch_ms=settings.flat_batch_ms,
        latency_target_ms=settings.latency_target_ms,
    )


def pipeline_config(settings: Settings) -> PipelineConfig:
    return PipelineConfig(
        limits=settings.limits,
        max_request_pixels=settings.max_request_pixels,
        request_timeout_ms=settings.request_timeout_ms,
    )


def admission_config(settings: Settings) -> AdmissionConfig:
    return AdmissionConfig(
        request_timeout_ms=settings.request_timeout_ms,
        admission_wait_ms=settings.admission_wait_ms,
        max_buffered_bytes=settings.max_buffered_bytes,
        latency_target_ms=settings.latency_target_ms,
    )
