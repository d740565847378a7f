from __future__ import annotations

import json
import logging

from app.telemetry.logs import JsonFormatter, request_id


def record(message: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("app.test", logging.INFO, __file__, 1, message, None, None)
    entry.__dict__.update(extra)
    return entry


def test_json_line_with_extras_and_request_id() -> None:
    token = request_id.set("req-1")
    try:
        line = JsonFormatter().format(record("hello", status=200))
    finally:
        request_id.reset(token)
    entry = json.loads(line)
    assert entry["message"] == "hello"
    assert entry["level"] == "info"
    assert entry["status"] == 200
    assert entry["request_id"] == "req-1"
    assert "\n" not in line


def test_no_request_id_outside_a_request() -> None:
    assert "request_id" not in json.loads(JsonFormatter().format(record("idle")))
