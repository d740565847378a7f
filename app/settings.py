"""Server configuration. The only module that reads the environment (prefix ``RESNET_SERVE_``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cpus import cpu_share
from core.preprocess import DEFAULT_FORMATS, Limits

ENV_PREFIX = "RESNET_SERVE_"
Providers = Literal["auto", "cuda", "tensorrt", "cpu"]
Precision = Literal["auto", "fp32", "fp16", "int8"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
LogLevel = Literal["debug", "info", "warning", "error"]
MAX_LANES = 16  # each lane holds a batch's activations: bounded memory on large machines


def _default_decode_threads(data: dict[str, Any]) -> int:
    return min(4, cpu_share(data.get("workers", 1)))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, protected_namespaces=()
    )

    model_path: Path = Path("artifacts/model.onnx")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    # Files of keys, one per line (app.keys): set, they guard inference and /v1/model, or /metrics.
    api_keys_file: Path | None = None
    metrics_api_keys_file: Path | None = None

    # Processes serving the one port, each with its own session, batcher and admission
    # (app.workers): HTTP parsing and decoding then use every core.
    workers: int = Field(1, ge=1, le=64)
    # Each worker on its own equal slice of the cores (app.cpus.pin_worker says when it does not).
    pin_workers: bool = True

    # auto: CUDA where it works, else the CPU. cuda: CUDA or fail. tensorrt: TensorRT (fp16
    # engine, cached), falling back to CUDA, never to the CPU (app.providers).
    providers: Providers = "auto"
    # Which file beside model_path: auto serves model.fp16.onnx on CUDA where it exists (built
    # by `model build --also fp16`), model_path everywhere else; a pinned one must match.
    model_precision: Precision = "auto"
    # Threads of one batch's run under load. 0: the worker's share of the cores (cpu_share)
    # split among its lanes, at least one each. A batch alone on the machine runs on the
    # whole share (ort_spinning=adaptive).
    intra_op_threads: int = Field(0, ge=0)
    # When ORT's threads may busy-wait (app/session.py SPINNING): "adaptive" spins only for a
    # batch that has the machine to itself, on a second session (CPU only; more memory).
    ort_spinning: Literal["off", "adaptive", "in_run", "always"] = "adaptive"
    cuda_graphs: bool = True  # CUDA only: one captured graph per batch bucket
    cuda_conv_algo_search: Literal["exhaustive", "heuristic", "default"] = "exhaustive"
    cuda_prefer_nhwc: bool = False
    # TensorRT engines and timing cache; default: trt-cache/ beside model_path (must be writable).
    trt_cache_dir: Path | None = None
    graph_optimization: GraphOptimization = "all"

    max_batch_size: int = Field(8, ge=1, le=1024)
    # Batch shapes the model runs, as a JSON list ending at max_batch_size (a batch is padded up
    # to the next one). Default: every size 1..max_batch_size on the CPU, where a padded row
    # costs as much as a real one; powers of two on CUDA, where few shapes mean few kernels
    # to select and warm up (and one CUDA graph each).
    batch_buckets: tuple[int, ...] | None = None
    # Work-conserving by default (as Triton's dynamic batcher): an idle model runs what is queued
    # now, and batches form while it is busy. A wait > 0 only holds a lone image back.
    max_wait_ms: float = Field(0.0, ge=0)
    # Batches grow to max_batch_size only where that cuts the cost per image (timed at warm-up
    # on every lane at once). Where it does not, they stop at the first size whose run takes
    # this long: a request that just missed a batch then waits for a short one (app.batch_limit).
    # A very large value: always up to max_batch_size.
    flat_batch_ms: float = Field(200.0, ge=0)
    max_queue_images: int = Field(1024, ge=1)
    # Batches computing at once on the one session, each on its own inference thread ("lanes").
    # 0: on the CPU one per core of the worker's share (at most 16), each run on one thread:
    # no thread pool to wake and no barrier after each operator, and the cores stay busy
    # between one lane's batches (benchmarks/results/lanes.md: up to +25% over one lane on two
    # threads, level at worst); on a GPU 1, since one stream of batches keeps it busy.
    concurrent_batches: int = Field(0, ge=0, le=MAX_LANES)
    # A request alone on the server does its work on the event loop where it is predicted to take
    # under this many ms (its image's decode; its batch's run, CPU and ort_spinning=adaptive
    # only), saving the hand-offs to a thread and back (benchmarks/results/lanes.md); the loop
    # stalls that long. 0: never.
    inline_max_ms: float = Field(5.0, ge=0)
    # From the moment the body is in: admission sheds what cannot finish inside it (503), and
    # what still overstays it answers 504 without using the model.
    request_timeout_ms: float = Field(5_000.0, gt=0)
    # Longest wait for room before the body is read; then 503. Paces clients that retry at once.
    admission_wait_ms: float = Field(1_000.0, ge=0)
    upload_timeout_ms: float = Field(30_000.0, gt=0, description="whole body, else 408")
    max_buffered_bytes: int = Field(256 * 1024 * 1024, ge=1, description="all uploads together")
    retry_after_s: int = Field(1, ge=1, description="Retry-After on every 503")
    # Default: the worker's share of the cores, at most 4.
    decode_threads: int = Field(default_factory=_default_decode_threads, ge=1)
    shutdown_timeout_s: int = Field(30, ge=1)

    default_top_k: int = Field(5, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_images_per_request: int = Field(16, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Decoded pixels one request may cost (after JPEG draft scaling): bounds its decode CPU.
    max_request_pixels: int = Field(100_000_000, ge=1)
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(
                f"max_queue_images={self.max_queue_images} must be at least "
                f"max_images_per_request={self.max_images_per_request}, "
                "or the largest allowed request could never be admitted"
            )
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels={self.max_request_pixels} must be at least "
                f"max_image_pixels={self.max_image_pixels}"
            )
        if self.batch_buckets is not None:
            buckets = self.batch_buckets
            if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
                raise ValueError(f"batch_buckets={list(buckets)} must be ascending, unique, >= 1")
            if buckets[-1] != self.max_batch_size:
                raise ValueError(
                    f"batch_buckets={list(buckets)} must end at "
                    f"max_batch_size={self.max_batch_size}"
                )
        unknown = sorted(set(self.allowed_formats) - set(DEFAULT_FORMATS))
        if unknown:
            raise ValueError(f"allowed_formats {unknown} are not among {list(DEFAULT_FORMATS)}")
        # A misspelt variable would otherwise be ignored in silence and its default used.
        typos = sorted(
            name
            for name in os.environ
            if name.upper().startswith(ENV_PREFIX)
            and name[len(ENV_PREFIX) :].lower() not in type(self).model_fields
        )
        if typos:
            raise ValueError(f"unknown settings in the environment: {typos}")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(max_pixels=self.max_image_pixels, formats=self.allowed_formats)
