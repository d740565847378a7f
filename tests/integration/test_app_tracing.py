"""Traces of the pipeline (app.telemetry.tracing), read from the SDK's in-memory exporter: the span
tree of one request, one batch span linked to every request it served, sampling, refusals, and
an exporter that is down or slow costing no request anything."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from app.settings import Settings
from app.telemetry import tracing
from tests.conftest import running
from tests.helpers.metrics import families
from tests.helpers.models import image_bytes

pytestmark = pytest.mark.anyio

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"
SAMPLED = {"traceparent": f"00-{TRACE}-{CALLER}-01"}


def upload(seed: int = 1) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{seed}.png", image_bytes(seed), "image/png"))]


@asynccontextmanager
async def traced(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    exporter: SpanExporter | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "_exporter", lambda name, otel: exporter or memory)
    async with running(make_settings, trace_exporter="otlp", **overrides) as (app, client):
        memory.clear()  # warm-up made no spans, but be sure
        yield app, client, memory


def finished(app: FastAPI, memory: InMemorySpanExporter) -> list[ReadableSpan]:
    assert app.state.service.tracing.provider.force_flush()
    return list(memory.get_finished_spans())


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_a_sampled_request_is_one_server_span_with_a_child_per_stage(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with traced(make_settings, monkeypatch) as (app, client, memory):
        response = await client.post("/predict", files=upload(), headers=SAMPLED)
        metrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        spans = finished(app, memory)
    assert response.status_code == 200
    (server,) = named(spans, "POST /predict")
    assert server.context is not None
    assert server.parent is not None
    assert f"{server.context.trace_id:032x}" == TRACE
    assert f"{server.parent.span_id:016x}" == CALLER  # the caller's span is its parent
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/predict"
    assert server.attributes["http.response.status_code"] == 200
    span_id = f"{server.context.span_id:016x}"
    assert response.headers["traceresponse"] == f"00-{TRACE}-{span_id}-01"

    children = {s.name: s for s in spans if s.parent and s.parent.span_id == server.context.span_id}
    assert set(children) == {"admission", "read body", "decode", "queue", "inference"}
    decode = children["decode"].attributes
    assert decode is not None
    assert decode["resnet_serve.image.format"] == "PNG"
    assert decode["resnet_serve.image.pixels"] == 40 * 30
    # In order: through the door, the upload, the decode, the queue, the run.
    order = ["admission", "read body", "decode", "queue", "inference"]
    starts = [children[name].start_time or 0 for name in order]
    assert starts == sorted(starts)
    assert all(
        (server.start_time or 0)
        <= (s.start_time or 0)
        <= (s.end_time or 0)
        <= (server.end_time or 0)
        for s in children.values()
    )

    (batch,) = named(spans, "batch")
    assert batch.parent is None  # a root of its own, linked to the request it served
    assert batch.context is not None
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    assert batch.attributes is not None
    assert batch.attributes["resnet_serve.batch.size"] == 1
    assert batch.attributes["resnet_serve.model"] == "tiny-test"
    for name in ("queue", "inference"):
        assert [link.context.span_id for link in children[name].links] == [batch.context.span_id]

    # The latency histogram carries the trace id as an OpenMetrics exemplar.
    exemplars = {
        sample.exemplar.labels["trace_id"]
        for family in text_string_to_metric_families(metrics.text)  # type: ignore[no-untyped-call]
        for sample in family.samples
        if sample.exemplar is not None
    }
    assert exemplars == {TRACE}


async def test_one_batch_span_is_linked_to_every_request_it_served(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long batching window and one lane: four clients' images meet in one batch.
    settings: dict[str, Any] = {"max_wait_ms": 500, "concurrent_batches": 1, "inline_max_ms": 0}
    async with traced(make_settings, monkeypatch, **settings) as (app, client, memory):
        headers = [{"traceparent": f"00-{TRACE[:-1]}{i}-{CALLER}-01"} for i in range(4)]
        answers = await asyncio.gather(
            *(client.post("/predict", files=upload(i), headers=h) for i, h in enumerate(headers))
        )
        spans = finished(app, memory)
    assert [a.status_code for a in answers] == [200] * 4
    servers = named(spans, "POST /predict")
    (batch,) = named(spans, "batch")
    assert batch.attributes is not None
    assert batch.attributes["resnet_serve.batch.size"] == 4
    linked = {link.context.span_id for link in batch.links}
    assert linked == {s.context.span_id for s in servers if s.context}
    assert len({s.context.trace_id for s in servers if s.context}) == 4


@pytest.mark.parametrize(
    ("headers", "ratio", "spans"),
    [
        ({}, None, 0),  # no caller trace, ratio 0: nothing is recorded
        ({"traceparent": f"00-{TRACE}-{CALLER}-00"}, None, 0),  # the caller did not sample
        ({}, 1.0, 1),  # ratio 1: every request starts a trace
        ({"traceparent": "00-not-a-trace-01"}, 1.0, 1),  # malformed: a new trace, no error
        ({"traceparent": "garbage", "tracestate": "=,="}, None, 0),
    ],
    ids=["no-parent", "unsampled-parent", "ratio-one", "malformed-new-trace", "malformed-ratio-0"],
)
async def test_sampling_follows_the_caller_then_the_ratio(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    headers: dict[str, str],
    ratio: float | None,
    spans: int,
) -> None:
    async with traced(make_settings, monkeypatch, trace_sample_ratio=ratio) as (
        app,
        client,
        memory,
    ):
        response = await client.post("/predict", files=upload(), headers=headers)
        servers = named(finished(app, memory), "POST /predict")
    assert response.status_code == 200
    assert len(servers) == spans
    if servers and servers[0].context:
        assert f"{servers[0].context.trace_id:032x}" != TRACE


async def test_a_refusal_ends_its_span_with_the_status_and_the_reason(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with traced(make_settings, monkeypatch) as (app, client, memory):
        text = [("files", ("notes.txt", b"not an image", "text/plain"))]
        refused = await client.post("/predict", files=text, headers=SAMPLED)
        spans = finished(app, memory)
    assert refused.status_code == 415
    (server,) = named(spans, "POST /predict")
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 415
    assert server.attributes["error.type"] == "unsupported_media_type"
    assert "not an image" in str(server.attributes["resnet_serve.refusal"])
    (decode,) = named(spans, "decode")
    assert not decode.status.is_ok
    assert "not an image" in str(decode.status.description)


class Stalled(SpanExporter):
    """A collector that holds every export until released, then fails it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(timeout=60)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


async def test_a_stuck_failing_exporter_costs_requests_nothing_and_drops_are_counted(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled = Stalled()
    async with traced(make_settings, monkeypatch, stalled, trace_queue_spans=4) as (
        app,
        client,
        _,
    ):
        first = await client.post("/predict", files=upload(), headers=SAMPLED)
        app.state.service.tracing.provider.force_flush(timeout_millis=1)  # wakes the export thread
        assert await asyncio.to_thread(stalled.entered.wait, 30)  # and it is stuck in export
        answers = [
            await client.post("/predict", files=upload(), headers=SAMPLED) for _ in range(10)
        ]
        answered_while_stuck = not stalled.release.is_set()
        stalled.release.set()
        assert app.state.service.tracing.provider.force_flush(timeout_millis=30_000)
        metrics = (await client.get("/metrics")).text
    assert [a.status_code for a in [first, *answers]] == [200] * 11
    assert answered_while_stuck  # no request waited for the exporter
    dropped = families(metrics)["resnet_serve_trace_spans_dropped"].samples[0].value
    # Ten requests of 7 spans each met a full queue of 4: all but 4 of theirs were dropped.
    assert dropped >= 10 * 7 - 4


async def test_the_protocols_infer_is_traced_the_same_way(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = base64.b64encode(image_bytes(2)).decode()
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [data]}]}
    async with traced(make_settings, monkeypatch) as (app, client, memory):
        response = await client.post("/v2/models/tiny-test/infer", json=body, headers=SAMPLED)
        spans = finished(app, memory)
    assert response.status_code == 200
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    assert server.name == "POST /v2/models/{model_name}/infer"
    assert server.context is not None
    children = {s.name for s in spans if s.parent and s.parent.span_id == server.context.span_id}
    assert children == {"admission", "read body", "decode", "queue", "inference"}
    assert len(named(spans, "batch")) == 1
