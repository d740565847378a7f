"""Server configuration. The only module that reads the environment: ``RESNET_SERVE_*``, and the
standard ``OTEL_*`` variables that decide what tracing builds (``OtelVariables``; the SDK's
exporters read the rest of ``OTEL_EXPORTER_OTLP_*`` themselves)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.process.cpus import cpu_share
from app.repository.policy import VersionPolicy
from core.preprocess import DEFAULT_FORMATS, Limits

ENV_PREFIX = "RESNET_SERVE_"
Providers = Literal["auto", "cuda", "tensorrt", "cpu"]
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
BackendName = Literal["auto", "onnxruntime", "openvino"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
LogLevel = Literal["debug", "info", "warning", "error"]
MAX_LANES = 16  # each lane holds a batch's activations: bounded memory on large machines


def _default_decode_threads(data: dict[str, Any]) -> int:
    return min(4, cpu_share(data.get("workers", 1)))


def _default_tuning_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "resnet-serve" / "tuning"


class Settings(BaseSettings):
    """Every setting, with its default and meaning: each attribute's docstring is its
    description in the configuration reference (docs/configuration.md is generated from here)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,
    )

    model_path: Path = Path("artifacts/model.onnx")
    """The ONNX file to serve when there is no model_repository: a one-model repository named and
    versioned by the file's metadata (its labels, preprocessing and identity come from there)."""
    model_repository: Path | None = None
    """A model repository, Triton's layout: DIR/<name>/<version>/model.onnx, versions positive
    integers, precision variants (model.int8.onnx, model.fp16.onnx) beside (docs/repository.md).
    Set, it replaces model_path."""
    version_policy: str = "latest"
    """Which versions of each model in model_repository to serve: latest, latest:N, all, or
    specific:V[,V...]. A load request may bring its own (Triton's version_policy in its
    config)."""
    default_model: str | None = None
    """The model that requests naming none go to (readiness waits for it). Unset: the only model
    served; with several, a request that names none is refused (400 model_required)."""
    repository_poll_s: float = Field(0.0, ge=0)
    """Look at model_repository (or model_path) this often and load what changed: a new version
    once its files have settled, a model folder that appeared or went. 0: only at start-up, on
    SIGHUP and through the repository API."""
    rollout_compare_share: float = Field(0.05, gt=0, le=1)
    """The most of the compute a rollout's comparisons take (a canary's answers run again on the
    baseline, a shadow's copies on the candidate), unless its request says otherwise; beyond it
    comparisons are dropped, never the clients' work (docs/rollouts.md)."""
    memory_budget_mib: int = Field(0, ge=0)
    """Resident memory a model load may take this process to (each version's sessions estimated
    from its file's size); a load over it fails with a clear error and the serving versions go
    on, instead of an OOM kill. 0: no budget."""
    repository_api_keys_file: Path | None = None
    """A file of keys for the repository API (/v2/repository/...: index, load, unload). While any
    key file is configured, that API needs one of these keys (an inference key cannot unload a
    model); with no key files at all it is open."""
    host: str = "0.0.0.0"
    """Bind address."""
    port: int = Field(8000, ge=0, le=65535)
    """Bind port."""
    grpc_port: int = Field(8001, ge=0, le=65535)
    """The Open Inference Protocol over gRPC (docs/grpc.md), on host, beside HTTP: same models,
    limits, keys and metrics. 0: off."""
    log_level: LogLevel = "info"
    """debug, info, warning or error: JSON lines, each with the request id while serving one.
    Health probes are logged at debug."""
    api_keys_file: Path | None = None
    """A file of API keys, one per line (app.edge.access). Set, inference, /v1/model and the
    protocol's model routes need one of them (Authorization: Bearer or X-API-Key). Unset: open."""
    metrics_api_keys_file: Path | None = None
    """A separate file of keys for /metrics (a scraper's key cannot run inference). Unset: open."""
    trace_exporter: Literal["none", "otlp", "console"] | None = None
    """Where traces go (docs/tracing.md): otlp (OTEL_EXPORTER_OTLP_* name the endpoint and the
    protocol, http/protobuf or grpc), console (stderr), or none: tracing off, no span made.
    Unset: OTEL_TRACES_EXPORTER, else none."""
    trace_sample_ratio: float | None = Field(None, ge=0, le=1)
    """The share of requests that start a trace of their own; a request whose traceparent is
    sampled is always traced. Unset: OTEL_TRACES_SAMPLER (and OTEL_TRACES_SAMPLER_ARG), else 0."""
    trace_queue_spans: int = Field(2048, ge=1)
    """Finished spans waiting for the exporter. Past it spans are dropped and counted
    (resnet_serve_trace_spans_dropped_total): a slow or absent collector never delays a
    request."""

    workers: int = Field(1, ge=1, le=64)
    """Processes serving the one port, each with its own session, batcher and admission
    (app.process.workers): HTTP parsing and decoding then use every core."""
    pin_workers: bool = True
    """Each worker on its own equal slice of the cores; not when they do not divide evenly, nor
    under a CPU quota (app.process.cpus.pin_worker)."""

    providers: Providers = "auto"
    """auto: CUDA where it loads, else the CPU (the reason is logged). cuda: CUDA or fail.
    tensorrt: TensorRT's fp16 engine (cached), falling back to CUDA, never to the CPU. cpu."""
    model_precision: Precision = "auto"
    """Which file beside model_path: auto serves model.fp16.onnx on CUDA where it exists (built by
    `model build --also fp16`) and model_path everywhere else (never fp16 on the CPU), computed in
    bf16 where the backend is auto, the CPU has bf16 and it is timed fastest; fp32, fp16 or int8 pin
    one (that variant beside model_path, or model_path itself, whose metadata must agree); bf16
    computes the fp32 file in bf16 on OpenVINO (a start-up error on a CPU without bf16)."""
    backend: BackendName = "auto"
    """The runtime on the CPU (docs/backends.md). auto: each candidate (ONNX Runtime, OpenVINO;
    fp32, bf16 where the CPU has it) is timed at the smallest and the largest batch, and each
    batch size is served by the fastest for it that passes the file's reference check, ONNX
    Runtime unless another is 10% faster (two runtimes at most, both within memory_budget_mib);
    the timings are logged, kept (tuning) and in /v1/model. onnxruntime, openvino: that one or a
    start-up error. GPUs: ONNX Runtime."""
    tuning: Literal["cache", "retime", "off"] = "cache"
    """What auto does with its timings (docs/backends.md). cache: reuse those kept in
    tuning_cache_dir for the same file, CPU model, runtime versions and threads, else time and
    keep them, so replicas choose alike and start sooner; retime: time again once per start
    (the workers of one start share it) and keep that; off: time at every load, keep nothing."""
    tuning_cache_dir: Path = Field(default_factory=_default_tuning_cache_dir)
    """Where auto's timings are kept, one small JSON file per file, CPU, runtimes and threads: a
    volume shared by replicas makes them serve alike. Unwritable: logged, and auto times at
    every load. Default: $XDG_CACHE_HOME/resnet-serve/tuning, else
    ~/.cache/resnet-serve/tuning."""
    reference_check: bool = True
    """Check, before a version serves, that this runtime computes the file's reference outputs
    (its metadata, written by export) within its precision's bounds; a file without them is
    refused. false serves unchecked, logged at warning: for files made by other tools."""
    bf16: bool = True
    """Whether auto may compute the fp32 file in bf16 (OpenVINO) on a CPU that has it: false
    serves as a CPU without bf16 does. An explicit model_precision=bf16 wins."""
    intra_op_threads: int = Field(0, ge=0)
    """ONNX Runtime threads of one batch's run under load. 0: the worker's share of the cores
    (its affinity, capped by a cgroup CPU quota, divided among the workers) split among its lanes,
    at least one: one thread per lane on the CPU."""
    ort_spinning: Literal["off", "adaptive", "in_run", "always"] = "adaptive"
    """When ONNX Runtime's threads may busy-wait for work. adaptive: never under load, plus a
    second CPU session whose threads spin within a run for a batch that has the machine to itself
    (a lone request gets spinning's latency; costs a second copy of the weights). off: never
    (least memory). in_run: within each run. always: ORT's own default, also between runs."""
    cuda_graphs: bool = True
    """CUDA only: one CUDA graph per batch bucket, captured at warm-up and replayed."""
    cuda_conv_algo_search: Literal["exhaustive", "heuristic", "default"] = "exhaustive"
    """cuDNN's convolution algorithm search; exhaustive is paid once per bucket at warm-up."""
    cuda_prefer_nhwc: bool = False
    """CUDA: channels-last kernels where ONNX Runtime has them."""
    trt_cache_dir: Path | None = None
    """TensorRT engines and timing cache (must be writable). Default: trt-cache/ beside
    model_path."""
    graph_optimization: GraphOptimization = "all"
    """ONNX Runtime's graph optimisation level: disable, basic, extended or all."""

    max_batch_size: int = Field(8, ge=1, le=1024)
    """The most images one model call takes."""
    batch_buckets: tuple[int, ...] | None = None
    """The batch shapes the model runs, as a JSON list ending at max_batch_size; a batch is padded
    with zero images up to the next one (padding never reaches a response) and every bucket is
    warmed up before ready. Default: every size 1..max_batch_size on the CPU, where a padded row
    costs as much as a real one; powers of two on CUDA (few shapes: few kernels, one CUDA graph
    each)."""
    max_wait_ms: float = Field(0.0, ge=0)
    """Extra wait for a batch to fill. 0: work-conserving, as Triton's dynamic batcher: an idle
    model runs what is queued now, and batches form while it is busy."""
    flat_batch_ms: float = Field(200.0, ge=0)
    """Batches grow to max_batch_size only where that cuts the cost per image (timed at warm-up on
    every lane at once); where it does not, they stop at the first size whose run takes this long,
    so a request that just missed a batch waits for a short one (app.batching.limit). A very
    large value: always up to max_batch_size."""
    max_queue_images: int = Field(1024, ge=1)
    """Images the batch queue holds (memory); beyond it 503 with Retry-After."""
    concurrent_batches: int = Field(0, ge=0, le=MAX_LANES)
    """Batches computing at once on the one session, each on its own inference thread (lanes,
    like Triton's instance count). 0: on the CPU one lane per core of the worker's share (at most
    16), each run on one thread; on a GPU one."""
    inline_max_ms: float = Field(5.0, ge=0)
    """A request alone on the server decodes its image, and runs its batch, on the event loop
    where that is predicted to take under this (app.batching.lanes): no hand-off to a thread and
    back; other connections wait that long. 0: never."""
    latency_target_ms: float | None = Field(None, gt=0)
    """The p99 the operator wants for a request's time in the server once its body is in. Set,
    the door learns how many images may be in flight before 1% of requests miss it, and refuses
    at once (503 with Retry-After) what would go past that instead of queueing it; and a batch
    may take at most a quarter of it (docs/latency.md). Unset: requests queue for as long as
    request_timeout_ms allows."""
    request_timeout_ms: float = Field(5_000.0, gt=0)
    """Deadline from the moment a request's body is in: admission lets in only what the model can
    finish inside it (else 503), and what still overstays it answers 504 without using the
    model."""
    admission_wait_ms: float = Field(1_000.0, ge=0)
    """Longest wait for room before the body is read; then 503 with Retry-After. Paces clients
    that retry at once."""
    upload_timeout_ms: float = Field(30_000.0, gt=0)
    """The whole body must arrive within this; else 408 and the connection is closed."""
    keep_alive_timeout_s: int = Field(75, ge=1)
    """An idle keep-alive connection is closed after this. Longer than the idle expiry of client
    pools (httpx 5 s, aiohttp 15 s) and load balancers (AWS ALB 60 s) in front: a server that
    closes first races the client's next request, which then fails unsent-or-not (nginx's
    default, 75 s)."""
    max_buffered_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """Request bytes held in memory by all uploads together; beyond it 503."""
    retry_after_s: int = Field(1, ge=1)
    """Retry-After on every 503."""
    decode_threads: int = Field(default_factory=_default_decode_threads, ge=1)
    """Each worker's thread pool for decoding, resizing and cropping. Default: the worker's share
    of the cores, at most 4."""
    shutdown_timeout_s: int = Field(30, ge=1)
    """Graceful-shutdown limit: the drain of what was admitted."""

    default_top_k: int = Field(5, ge=1)
    """top_k when a request does not say (capped at the number of classes)."""
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    """Bytes per image."""
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1)
    """Bytes per request, enforced while the body streams in."""
    max_images_per_request: int = Field(16, ge=1)
    """Images per request (multipart files, or the protocol's N)."""
    max_image_pixels: int = Field(40_000_000, ge=1)
    """Decoded pixels per image, checked from its header before decoding."""
    max_request_pixels: int = Field(100_000_000, ge=1)
    """Pixels all images of one request decode to (after JPEG draft scaling), checked from the
    headers before decoding anything: bounds one request's decode CPU."""
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    """Image formats accepted, as a JSON list: a subset of JPEG, PNG, WEBP, BMP, GIF, TIFF, AVIF,
    HEIF (HEIC photos; detected from the bytes, not the name)."""

    cache_bytes: int = Field(0, ge=0)
    """Answers kept for repeated images, per worker, least recently used dropped first: a
    repeated image (the same bytes, model version, endpoint and parameters) is answered without
    decode or inference. 0 (the default): off, as Triton's response cache is, since most traffic
    (users' photos) rarely repeats and a load test of one image would measure the cache. Where
    images repeat, 67108864 (64 MiB) holds about 100,000 top-5 answers or 7,000 ResNet-50
    embeddings, small beside a model's sessions (docs/api.md)."""
    url_allow: tuple[str, ...] = ()
    """Where /predict, /embed and /explain may fetch images given as {"urls": [...]}, as a JSON
    list: host names, *.patterns of them, IP addresses or networks (CIDR). Empty: off. An address
    in a loopback, private, link-local (169.254.169.254) or multicast range is refused unless an
    IP or network entry holds it (docs/security.md)."""
    url_timeout_ms: float = Field(5000.0, gt=0)
    """The most one image's fetch may take, redirects and body included."""
    url_max_redirects: int = Field(3, ge=0, le=20)
    """Redirects a fetch follows, each hop checked against url_allow again."""
    url_fetch_concurrency: int = Field(8, ge=1, le=256)
    """Fetches in flight at once, per worker."""
    rate_limit_delay_ms: float = Field(1000.0, ge=0, le=60_000)
    """The most a request over its key's rate limit waits before its 429: it is answered when
    the key's next request would be let through (behind its other refusals waiting), and says
    how much longer to wait (Retry-After, RateLimit). A client that resends at once is then
    paced to its rate instead of costing the server a refusal per round trip (32 such clients
    took 2,300 refusals a second, about 40% of a core, from the other keys). 0: at once."""
    redis_url: str | None = None
    """A Redis the replicas share (redis://[:password@]host:port/db, rediss:// for TLS): per-key
    rate limits then hold for the whole service, and the answer cache (cache_bytes) is shared
    too. Unset: each server keeps them itself (its workers share the rate limits). If Redis
    stops answering, the server serves on its own state, says so (resnet_serve_redis_up, a
    warning) and asks Redis again a second later: no request fails for it (docs/security.md)."""
    redis_timeout_ms: float = Field(100.0, gt=0, le=10_000)
    """The most a Redis call may take before the server goes on without it."""
    redis_cache_ttl_s: int = Field(3600, ge=1)
    """How long an answer stays in the shared cache; Redis's own maxmemory policy (allkeys-lru
    in the compose file) keeps it within its memory."""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port={self.grpc_port} is the HTTP port: give it its own, or 0")
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
        if self.model_repository is not None and "model_path" in self.model_fields_set:
            raise ValueError("set model_repository or model_path, not both")
        VersionPolicy.parse(self.version_policy)
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


@dataclass(frozen=True)
class OtelVariables:
    """OpenTelemetry's standard variables for traces, as set (app.telemetry.tracing checks them);
    the service's own trace_* settings win where set."""

    traces_exporter: str
    protocol: str  # OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL
    sampler: str
    sampler_arg: str

    @classmethod
    def read(cls) -> OtelVariables:
        env = os.environ
        protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        return cls(
            traces_exporter=env.get("OTEL_TRACES_EXPORTER", ""),
            protocol=env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol),
            sampler=env.get("OTEL_TRACES_SAMPLER", ""),
            sampler_arg=env.get("OTEL_TRACES_SAMPLER_ARG", ""),
        )
