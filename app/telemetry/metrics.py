"""Prometheus metrics on a per-app registry, so tests (and embedders) can build many apps.

With several workers (app.process.workers) every process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen when it is imported),
and ``/metrics``, whichever worker answers it, reads them all: counters and histograms summed over
every worker that ever ran, gauges over the live ones (``livesum``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

# Seconds; spans sub-millisecond preprocessing up to multi-second overload latencies.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


# How often a worker writes its callback gauges to the shared files: fresher than any scrape.
SAMPLE_INTERVAL_S = 0.1
# The metrics of one served model version carry these labels (app.repository.version).
VERSION_LABELS = ["model", "version"]


class Metrics:
    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        self._sampled: list[tuple[Gauge, Callable[[], float]]] = []
        self.registry = CollectorRegistry()
        self._requests(self.registry)
        self._admission(self.registry)
        self._batches(self.registry)
        self._lanes(self.registry)
        self._models(self.registry)
        self._rollouts(self.registry)
        self._cache(self.registry)
        self._limits(self.registry)

    def _requests(self, registry: CollectorRegistry) -> None:
        """Requests, HTTP's and gRPC's alike: counted, timed, by caller class, refused keys."""
        self.requests = Counter(
            "resnet_serve_requests",
            "Requests (HTTP and gRPC) by endpoint (route template or gRPC method) and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "resnet_serve_request_duration_seconds",
            "Request latency (HTTP and gRPC), by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Bounded: a key's name from the key file, "unnamed", or "anonymous" (app.edge.requests).
        self.caller_requests = Counter(
            "resnet_serve_caller_requests",
            "Inference requests (HTTP and gRPC) by caller class and status code",
            ["caller", "status"],
            registry=registry,
        )
        self.caller_request_seconds = Histogram(
            "resnet_serve_caller_request_duration_seconds",
            "Inference request latency by caller class",
            ["caller"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "resnet_serve_requests_in_flight",
            "HTTP requests being handled",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.auth_refused = Counter(
            "resnet_serve_auth_refused",
            "Requests refused for a missing, empty, too long or invalid API key, by reason",
            ["reason"],
            registry=registry,
        )

    def _admission(self, registry: CollectorRegistry) -> None:
        """The door: what is admitted, waiting, buffered or refused before the work."""
        self.rejected = Counter(
            "resnet_serve_rejected",
            "Inference requests refused before their body was read or before decoding, by reason",
            ["reason"],
            registry=registry,
        )
        self.deadline_dropped = Counter(
            "resnet_serve_deadline_dropped",
            "Requests (door, decode) and images (queue) dropped before the model because their "
            "deadline (request_timeout_ms, or the client's own) could no longer be met",
            ["stage"],
            registry=registry,
        )
        self.pending_images = Gauge(
            "resnet_serve_pending_images",
            "Images admitted (body read) and not finished: decoding, queued or computing",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.admission_wait_seconds = Histogram(
            "resnet_serve_admission_wait_seconds",
            "Time an inference request waited at the door before it was admitted or refused",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.door_waiting = Gauge(
            "resnet_serve_admission_waiting",
            "Inference requests waiting for room before their body is read",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.buffered_bytes = Gauge(
            "resnet_serve_buffered_bytes",
            "Bytes of request bodies being received, all requests together",
            multiprocess_mode="livesum",
            registry=registry,
        )

    def _batches(self, registry: CollectorRegistry) -> None:
        """The pipeline's decodes, and each model version's batches (labelled by model, version)."""
        self.preprocess_seconds = Histogram(
            "resnet_serve_preprocess_seconds",
            "Decode, resize and crop time per image",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "resnet_serve_queue_wait_seconds",
            "Time an image waited in the batch queue",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "resnet_serve_inference_seconds",
            "Model time per batch",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "resnet_serve_batch_size",
            "Images per model call",
            VERSION_LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.padded_batch_size = Histogram(
            "resnet_serve_padded_batch_size",
            "Images per model call including padding up to the batch bucket",
            VERSION_LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

    def _lanes(self, registry: CollectorRegistry) -> None:
        """Each model version's queue, lanes and batch limit, and the images it classified."""
        self.queue_depth = Gauge(
            "resnet_serve_queue_depth",
            "Images waiting for a batch",
            VERSION_LABELS,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.lane_busy_seconds = Counter(
            "resnet_serve_lane_busy_seconds",
            "Seconds each lane spent running batches (lane 'loop': lone batches run inline)",
            [*VERSION_LABELS, "lane"],
            registry=registry,
        )
        self.batch_limit = Gauge(
            "resnet_serve_batch_limit",
            "The most images one batch takes (fitted at warm-up: app.batching.limit)",
            VERSION_LABELS,
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.images = Counter(
            "resnet_serve_images",
            "Images classified by the model",
            VERSION_LABELS,
            registry=registry,
        )

    def _models(self, registry: CollectorRegistry) -> None:
        """The model versions served, and what became of each one opened; the tracer's losses."""
        self.model = Info(
            "resnet_serve_model",
            "The model versions being served (name, version, provider, backend, precision)",
            VERSION_LABELS,
            registry=registry,
        )
        self.model_loads = Counter(
            "resnet_serve_model_loads",
            "Model versions opened, by outcome: ready, failed (never served), unloaded",
            ["model", "outcome"],
            registry=registry,
        )
        self.trace_spans_dropped = Counter(
            "resnet_serve_trace_spans_dropped",
            "Finished spans not exported: the export queue was full or the exporter failed",
            registry=registry,
        )

    def _cache(self, registry: CollectorRegistry) -> None:
        """Answers kept for repeated images (app.pipeline.cache), every worker's summed."""
        self.cache_hits = Counter(
            "resnet_serve_cache_hits", "Images answered from the cache", registry=registry
        )
        self.cache_misses = Counter(
            "resnet_serve_cache_misses",
            "Images looked up in the cache and computed",
            registry=registry,
        )
        self.cache_shared_hits = Counter(
            "resnet_serve_cache_shared_hits",
            "Images answered from the shared (Redis) cache, this worker's own having missed",
            registry=registry,
        )
        self.cache_evictions = Counter(
            "resnet_serve_cache_evictions",
            "Answers dropped, least recently used first, to keep within cache_bytes",
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "resnet_serve_cache_bytes",
            "Bytes the cached answers hold",
            multiprocess_mode="livesum",
            registry=registry,
        )

    def _limits(self, registry: CollectorRegistry) -> None:
        """Per-key rate limits (app.edge.limits) and the Redis the replicas share
        (app.store.redis)."""
        self.rate_limited = Counter(
            "resnet_serve_rate_limited",
            "Requests refused 429 for their key's rate limit, by caller class",
            ["caller"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "resnet_serve_redis_up",
            "1 while the shared Redis answers; 0 while this server serves on its own state "
            "(no series without RESNET_SERVE_REDIS_URL)",
            ["store"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.redis_errors = Counter(
            "resnet_serve_redis_errors",
            "Redis calls that failed or timed out, by use (limits, cache): served locally",
            ["use"],
            registry=registry,
        )

    def _rollouts(self, registry: CollectorRegistry) -> None:
        """Rollouts (app.repository.route): each version's requests by its role, and what the
        comparisons found. Agreement over time: rate(agreeing) / rate(compared_images)."""
        roles = [*VERSION_LABELS, "role"]
        self.rollout_requests = Counter(
            "resnet_serve_rollout_requests",
            "Requests a version answered in a rollout (a shadow's candidate: copies it ran)",
            roles,
            registry=registry,
        )
        self.rollout_errors = Counter(
            "resnet_serve_rollout_errors",
            "Of those, the ones the version failed (a server error, not a bad image)",
            roles,
            registry=registry,
        )
        self.rollout_compared = Counter(
            "resnet_serve_rollout_compared_images",
            "Images both versions of a rollout computed",
            ["model"],
            registry=registry,
        )
        self.rollout_agreeing = Counter(
            "resnet_serve_rollout_agreeing_images",
            "Of those, the images whose top class both versions agree on",
            ["model"],
            registry=registry,
        )
        self.rollout_dropped = Counter(
            "resnet_serve_rollout_dropped",
            "Comparisons not run, to keep them within their share of the compute",
            ["model"],
            registry=registry,
        )
        self.rollout_ends = Counter(
            "resnet_serve_rollout_ends",
            "Rollouts ended, by how: promoted, stopped, rolled_back (automatically)",
            ["model", "status"],
            registry=registry,
        )

    def track(self, gauge: Gauge, value: Callable[[], float]) -> None:
        """``value()`` is the gauge: read at scrape time, so the owner never has to remember to
        update it. A callback cannot be read from another process, so with several workers it
        is written to the shared files every SAMPLE_INTERVAL_S instead (``sample_forever``)."""
        if self.multiprocess:
            self._sampled.append((gauge, value))
        else:
            gauge.set_function(value)

    def untrack(self, gauge: Gauge) -> None:
        self._sampled = [(g, value) for g, value in self._sampled if g is not gauge]

    def for_version(self, name: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, name, version)

    def sample(self) -> None:
        for gauge, value in self._sampled:
            gauge.set(value())

    async def sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def render(self, openmetrics: bool = False) -> bytes:
        """The text format, or OpenMetrics (which carries exemplars; with several workers the
        values come from files, which hold no exemplars)."""
        generate = openmetrics_latest if openmetrics else generate_latest
        if not self.multiprocess:
            return generate(self.registry)
        self.sample()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        # An Info has no multiprocess form; every worker serves the same versions.
        registry.register(self.model)
        return generate(registry)


class VersionMetrics:
    """The per-version children of ``Metrics``: what one served model version's batcher records,
    removed from ``/metrics`` when the version is unloaded."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (name, version)
        self.queue_wait_seconds = metrics.queue_wait_seconds.labels(name, version)
        self.inference_seconds = metrics.inference_seconds.labels(name, version)
        self.batch_size = metrics.batch_size.labels(name, version)
        self.padded_batch_size = metrics.padded_batch_size.labels(name, version)
        self.images = metrics.images.labels(name, version)
        self.queue_deadline_dropped = metrics.deadline_dropped.labels("queue")

    def lane_busy(self, lane: str) -> Counter:
        """The lane's busy-seconds child (the batcher keeps it: a lookup takes a lock)."""
        return self._metrics.lane_busy_seconds.labels(*self._labels, lane)

    def track(self, queue_depth: Callable[[], float], batch_limit: Callable[[], float]) -> None:
        self._metrics.track(self._metrics.queue_depth.labels(*self._labels), queue_depth)
        self._metrics.track(self._metrics.batch_limit.labels(*self._labels), batch_limit)

    def describe(self, info: dict[str, str]) -> None:
        self._metrics.model.labels(*self._labels).info(info)

    def remove(self) -> None:
        """The version's live series leave /metrics; its counts and histograms stay, as a
        finished worker's do."""
        metrics = self._metrics
        for gauge in (metrics.queue_depth, metrics.batch_limit):
            child = gauge.labels(*self._labels)
            metrics.untrack(child)
            if metrics.multiprocess:  # its file outlives the child: a stale value would stay
                child.set(0)
            gauge.remove(*self._labels)
        metrics.model.remove(*self._labels)
