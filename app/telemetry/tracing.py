"""OpenTelemetry traces of the pipeline: one server span per request, with children for what this
service really does to it (admission, the upload, each decode, the batch queue, the model run),
and one span per batch linked to every request it served (docs/tracing.md).

Off unless an exporter is named (``trace_exporter`` or ``OTEL_TRACES_EXPORTER``): then no span is
made at all, and every call here returns at once. On, each app has its own tracer provider (tests
build many apps in one process), and stages that ran on other threads or ended before their span
could be opened are recorded afterwards with their measured start and end times.

Sampling is parent-based: a caller's sampled ``traceparent`` is traced; a request without one
starts a trace with probability ``trace_sample_ratio``; a batch span (a root of its own) is
sampled when any request it links to is.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status
from opentelemetry.trace import StatusCode as Code
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from app.settings import OtelVariables, Settings
from core.errors import ServiceError

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# How often the export thread sends what has ended, and the most spans it sends at once.
EXPORT_INTERVAL_S = 1.0
EXPORT_BATCH = 512


class Tracing:
    """One app's tracer. ``Tracing(None)`` is tracing off: nothing is made, nothing costs."""

    def __init__(self, provider: TracerProvider | None, roots: bool = True) -> None:
        """``roots``: whether a request without a caller's trace may start one (a ratio above
        0); where it may not, such a request makes no span at all."""
        self.provider = provider
        self.on = provider is not None
        self.roots = roots
        self._tracer = provider.get_tracer("resnet-serve") if provider is not None else None

    # -- the server span ------------------------------------------------------------------------

    @contextmanager
    def request(
        self,
        headers: Mapping[bytes, bytes],
        describe: Callable[[], tuple[str, Mapping[str, str]]],
    ) -> Iterator[Span | None]:
        """The request's (or gRPC call's) server span, current while it is handled; its parent
        is the caller's ``traceparent`` (a header, or gRPC metadata) where that parses (a
        malformed one starts a new trace). ``describe``: the span's name and attributes, asked
        only when a span is made."""
        if self._tracer is None or (not self.roots and b"traceparent" not in headers):
            yield None
            return
        carrier = {
            field: headers[key].decode("latin-1")
            for field in ("traceparent", "tracestate")
            if (key := field.encode()) in headers
        }
        parent = _PROPAGATOR.extract(carrier)
        name, attributes = describe()
        span = self._tracer.start_span(name, parent, kind=SpanKind.SERVER, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        finally:
            otel_context.detach(token)
            span.end()

    # -- stages recorded with their measured times ---------------------------------------------

    def stage(
        self,
        name: str,
        started_ns: int,
        ended_ns: int,
        attributes: Mapping[str, Any] | None = None,
        *,
        parent: SpanContext | None = None,
        links: Sequence[SpanContext] = (),
        error: str | None = None,
    ) -> SpanContext | None:
        """A span that already ended: a child of ``parent`` (default: the current span), or a
        root where ``parent`` is invalid. Returns its context (None when tracing is off)."""
        if self._tracer is None:
            return None
        context = (
            trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
        )
        span = self._tracer.start_span(
            name,
            context,
            attributes=attributes,
            links=[Link(link) for link in links],
            start_time=started_ns,
        )
        if error is not None:
            span.set_status(Status(Code.ERROR, error))
        span.end(end_time=ended_ns)
        return span.get_span_context()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """A child span of the current request around the block, with the error it raises."""
        parent = current() if self.on else None
        if parent is None:
            yield
            return
        started_ns = now_ns()
        try:
            yield
        except ServiceError as exc:
            self.stage(name, started_ns, now_ns(), parent=parent, error=exc.message)
            raise
        self.stage(name, started_ns, now_ns(), parent=parent)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


NO_TRACING = Tracing(None)


def current() -> SpanContext | None:
    """The current span's context, where it is sampled: what a queued image carries."""
    context = trace.get_current_span().get_span_context()
    return context if context.trace_flags.sampled else None


def now_ns() -> int:
    return time.time_ns()


def trace_id(span: Span | None) -> str | None:
    """The hex trace id of a span that is recorded, for logs, exemplars and the response."""
    if span is None or not span.is_recording():
        return None
    return trace.format_trace_id(span.get_span_context().trace_id)


def trace_response(span: Span | None) -> bytes | None:
    """W3C Trace Context level 2's ``traceresponse`` header for the request's span."""
    if span is None:
        return None
    context = span.get_span_context()
    if not context.is_valid:
        return None
    flags = int(context.trace_flags)
    return (
        f"00-{trace.format_trace_id(context.trace_id)}-"
        f"{trace.format_span_id(context.span_id)}-{flags:02x}"
    ).encode()


def end_status(
    span: Span | None,
    status: int,
    code: str | None,
    message: str | None,
    status_attribute: str = "http.response.status_code",
) -> None:
    """The response status on the server span; a refusal's code and reason beside it."""
    if span is None or not span.is_recording():
        return
    span.set_attribute(status_attribute, status)
    if code is not None:
        span.set_attribute("error.type", code)
    if status >= 500:
        span.set_status(Status(Code.ERROR, message or str(status)))
    elif message is not None:
        span.set_attribute("resnet_serve.refusal", message)


# -- set-up -----------------------------------------------------------------------------------


class TracingError(ValueError):
    """A tracing variable that names nothing this server has: one line at start-up."""


def check(settings: Settings, otel: OtelVariables | None = None) -> None:
    """Raises TracingError for an exporter, protocol or sampler that cannot be used."""
    otel = otel or OtelVariables.read()
    _exporter_name(settings, otel)
    _protocol(otel)
    _sampler(settings.trace_sample_ratio, otel)


def configure(settings: Settings, dropped: Counter, otel: OtelVariables | None = None) -> Tracing:
    """The app's tracing from its settings and the standard ``OTEL_*`` variables."""
    otel = otel or OtelVariables.read()
    name = _exporter_name(settings, otel)
    exporter = _exporter(name, otel)
    if exporter is None:
        return Tracing(None)
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "resnet-serve"}))
    base, roots = _sampler(settings.trace_sample_ratio, otel)
    sampler = _LinkedOrParent(base)
    provider = TracerProvider(sampler=sampler, resource=resource)
    provider.add_span_processor(QueueingProcessor(exporter, settings.trace_queue_spans, dropped))
    log.info("tracing", extra={"exporter": name, "sampler": sampler.get_description()})
    return Tracing(provider, roots=roots)


def _exporter_name(settings: Settings, otel: OtelVariables) -> str:
    name = (settings.trace_exporter or otel.traces_exporter).strip().lower() or "none"
    if name not in ("none", "otlp", "console"):
        raise TracingError(f"OTEL_TRACES_EXPORTER={name!r} is not otlp, console or none")
    return name


def _protocol(otel: OtelVariables) -> str:
    protocol = otel.protocol.strip().lower() or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise TracingError(f"OTLP protocol {protocol!r} is not http/protobuf or grpc")
    return protocol


def _exporter(name: str, otel: OtelVariables) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    # The exporters read their endpoint, headers and timeout from OTEL_EXPORTER_OTLP_* themselves.
    if _protocol(otel) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def _sampler(ratio: float | None, otel: OtelVariables) -> tuple[Sampler, bool]:
    """For requests: ``trace_sample_ratio``, else ``OTEL_TRACES_SAMPLER``, else parent-based
    with ratio 0 (only callers' sampled traces); and whether it may start a trace of its own."""
    if ratio is not None:
        return ParentBased(TraceIdRatioBased(ratio)), ratio > 0
    name = otel.sampler.strip().lower()
    try:
        argument = float(otel.sampler_arg or 1.0)
    except ValueError:
        raise TracingError("OTEL_TRACES_SAMPLER_ARG is not a number") from None
    if not 0 <= argument <= 1:
        raise TracingError(f"OTEL_TRACES_SAMPLER_ARG={argument} is not within [0, 1]")
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(argument),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(argument)),
        "": ParentBased(TraceIdRatioBased(0.0)),
    }
    if name not in samplers:
        raise TracingError(f"OTEL_TRACES_SAMPLER={name!r} is not one of {sorted(samplers)[1:]}")
    roots = name in ("always_on", "parentbased_always_on") or (
        name in ("traceidratio", "parentbased_traceidratio") and argument > 0
    )
    return samplers[name], roots


class _LinkedOrParent(Sampler):
    """A root span linked to a sampled span is sampled (a batch that served a traced request);
    everything else as ``base`` decides."""

    def __init__(self, base: Sampler) -> None:
        self.base = base

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and any(link.context.trace_flags.sampled for link in links or ()):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.base.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkedOrParent{{{self.base.get_description()}}}"


class QueueingProcessor(SpanProcessor):
    """Ended spans go to a bounded queue that a thread exports from: a request never waits for
    the exporter, and a span that finds the queue full is dropped and counted. The thread sends
    once a second, or as soon as a full batch is waiting: one request per span would cost the
    exporter's HTTP round trip each time (measured: most of the export thread's time)."""

    def __init__(self, exporter: SpanExporter, capacity: int, dropped: Counter) -> None:
        self.exporter = exporter
        self.dropped = dropped
        self._queue: queue.Queue[ReadableSpan] = queue.Queue(capacity)
        self._wake = threading.Event()
        self._stopping = False
        self._unsent = 0  # queued or being exported (force_flush waits for none)
        self._unsent_lock = threading.Lock()
        self._thread = threading.Thread(target=self._export, name="trace-export", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._unsent_lock:
            self._unsent += 1
        try:
            self._queue.put_nowait(span)
        except queue.Full:
            self._sent(1)
            self.dropped.inc()
            return
        if self._queue.qsize() >= EXPORT_BATCH:
            self._wake.set()

    def _export(self) -> None:
        while not self._stopping:
            self._wake.wait(EXPORT_INTERVAL_S)
            self._wake.clear()
            while batch := self._take(EXPORT_BATCH):
                self._send(batch)
                self._sent(len(batch))

    def _take(self, most: int) -> list[ReadableSpan]:
        batch: list[ReadableSpan] = []
        with contextlib.suppress(queue.Empty):
            while len(batch) < most:
                batch.append(self._queue.get_nowait())
        return batch

    def _sent(self, spans: int) -> None:
        with self._unsent_lock:
            self._unsent -= spans

    def _send(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self.exporter.export(batch)
        except Exception as exc:  # a collector that is down costs its spans, nothing else
            log.warning("trace export failed", extra={"spans": len(batch), "reason": repr(exc)})
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.dropped.inc(len(batch))

    def shutdown(self) -> None:
        """What is queued is sent first (the exporter's own timeout bounds each send)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        self._wake.set()
        while self._unsent and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._unsent
