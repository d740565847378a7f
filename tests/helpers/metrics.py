"""/metrics read the way Prometheus reads it: prometheus_client's own text parser."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def families(text: str) -> dict[str, Any]:
    """Prometheus text as {family name: family}."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A server's /metrics as {family name: family}."""
    return families(httpx.get(f"{url}/metrics", headers=headers, timeout=10).text)


def gauge(families: dict[str, Any], name: str) -> float:
    value: float = families[name].samples[0].value
    return value


def status_counts(families: dict[str, Any], endpoint: str = "/predict") -> dict[str, float]:
    return {
        s.labels["status"]: s.value
        for s in families["resnet_serve_requests"].samples
        if s.name.endswith("_total") and s.labels["endpoint"] == endpoint
    }


def wait_for_gauge(url: str, name: str, at_least: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gauge(scrape(url), name) >= at_least:
            return
    raise AssertionError(f"{name} never reached {at_least}: {scrape(url)}")
