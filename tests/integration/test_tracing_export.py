"""A real ``python -m app`` turned to tracing by the standard OpenTelemetry variables alone,
exporting to an OTLP receiver that decodes the wire format as a collector would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from tests.helpers.models import image_bytes
from tests.helpers.otlp import Spans, grpc_receiver, http_receiver
from tests.helpers.server import message_is, run_server

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
# The server span and its five stages, and the batch's own span.
SPANS = {"POST /predict", "admission", "read body", "decode", "queue", "inference", "batch"}


@pytest.mark.parametrize(
    ("protocol", "receiver"),
    [("http/protobuf", http_receiver), ("grpc", grpc_receiver)],
    ids=["otlp-http", "otlp-grpc"],
)
def test_otel_variables_alone_trace_and_export_a_callers_sampled_request(
    model_path: Path,
    protocol: str,
    receiver: Callable[[], AbstractContextManager[tuple[str, Spans]]],
) -> None:
    with receiver() as (endpoint, spans):
        environ = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "classifier-a",
        }
        with run_server(model_path, **environ) as server:
            server.wait_for_log(message_is("ready"))
            files = [("files", ("a.png", image_bytes(3), "image/png"))]
            untraced = httpx.post(f"{server.url}/predict", files=files, timeout=30)
            headers = {"traceparent": f"00-{TRACE}-{CALLER}-01"}
            answer = httpx.post(f"{server.url}/predict", files=files, headers=headers, timeout=30)
            logged = server.wait_for_log(
                lambda entry: entry.get("message") == "request" and "trace_id" in entry
            )
            received = spans.wait_for(len(SPANS))
    assert (untraced.status_code, answer.status_code) == (200, 200)
    assert logged["trace_id"] == TRACE
    assert {span.name for span in received} == SPANS  # the unsampled request sent none
    by_name = {span.name: span for span in received}
    server_span = by_name["POST /predict"]
    assert server_span.parent_span_id == CALLER
    assert {span.service for span in received} == {"classifier-a"}
    assert {span.trace_id for span in received if span.name != "batch"} == {TRACE}
    assert by_name["batch"].links == (server_span.span_id,)
    assert answer.headers["traceresponse"] == f"00-{TRACE}-{server_span.span_id}-01"


def test_a_client_run_with_trace_is_one_trace_through_the_server(
    model_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.png").write_bytes(image_bytes(seed))
    with http_receiver() as (endpoint, spans):
        environ = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        with run_server(model_path, **environ) as server:
            server.wait_for_log(message_is("ready"))
            command = [sys.executable, "-m", "app.client", str(folder), "--url", server.url]
            done = subprocess.run(
                [*command, "--trace", "--format", "jsonl"],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "TRACEPARENT": ""},
            )
            received = spans.wait_for(3 * 6)  # three requests' server spans and stages
    assert done.returncode == 0, done.stderr
    trace = done.stderr.strip().rsplit("trace ", 1)[1]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    sent = {row["traceparent"].split("-")[2] for row in rows}  # each request's own span id
    servers = [span for span in received if span.name == "POST /predict"]
    assert {span.trace_id for span in servers} == {trace}
    assert {span.parent_span_id for span in servers} == sent
    assert len(sent) == 3
