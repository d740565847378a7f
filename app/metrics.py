"""Prometheus metrics on a per-app registry, so tests (and embedders) can build many apps."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Seconds; spans sub-millisecond preprocessing up to multi-second overload latencies.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "resnet_serve_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "resnet_serve_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "resnet_serve_requests_in_flight", "HTTP requests being handled", registry=registry
        )
        self.preprocess_seconds = Histogram(
            "resnet_serve_preprocess_seconds",
            "Decode, resize and crop time per image",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "resnet_serve_queue_wait_seconds",
            "Time an image waited in the batch queue",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "resnet_serve_inference_seconds",
            "Model time per batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "resnet_serve_batch_size",
            "Images per model call",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.padded_batch_size = Histogram(
            "resnet_serve_padded_batch_size",
            "Images per model call including padding up to the batch bucket",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "resnet_serve_queue_depth", "Images waiting for a batch", registry=registry
        )
        self.rejected = Counter(
            "resnet_serve_rejected",
            "Inference requests refused before their body was read or before decoding, by reason",
            ["reason"],
            registry=registry,
        )
        self.auth_refused = Counter(
            "resnet_serve_auth_refused",
            "Requests refused for a missing, empty, too long or invalid API key, by reason",
            ["reason"],
            registry=registry,
        )
        self.pending_images = Gauge(
            "resnet_serve_pending_images",
            "Images admitted (body read) and not finished: decoding, queued or computing",
            registry=registry,
        )
        self.door_waiting = Gauge(
            "resnet_serve_admission_waiting",
            "Inference requests waiting for room before their body is read",
            registry=registry,
        )
        self.buffered_bytes = Gauge(
            "resnet_serve_buffered_bytes",
            "Bytes of request bodies being received, all requests together",
            registry=registry,
        )
        self.images = Counter(
            "resnet_serve_images", "Images classified by the model", registry=registry
        )
        self.model = Info("resnet_serve_model", "The model being served", registry=registry)

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        # Read at scrape time, so the batcher never has to remember to update it.
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
