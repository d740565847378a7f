"""The Grafana dashboard (deploy/k8s/dashboard/resnet-serve.json): it parses and every query names
metrics the app exposes. That the compose stack and Kubernetes ship the same file needs kubectl:
tests/integration/test_dashboard_k8s.py."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.telemetry.metrics import Metrics
from tests.helpers.k8s import dashboard

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\bresnet_serve_[a-z_]+\b")
SERIES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def exposed() -> set[str]:
    """Every series name the app's metrics can expose, observed or not."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in SERIES[family.type]
    }


def test_every_panel_queries_metrics_the_app_exposes() -> None:
    names = exposed()
    panels = dashboard()["panels"]
    assert len(panels) >= 8
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            found = set(METRIC.findall(target["expr"]))
            assert found, (panel["title"], target["expr"])
            assert found <= names, f"{panel['title']}: unknown {found - names}"
            used |= found
    # What the dashboard promises to show.
    for name in (
        "resnet_serve_images_total",
        "resnet_serve_rejected_total",
        "resnet_serve_request_duration_seconds_bucket",
        "resnet_serve_queue_depth",
        "resnet_serve_batch_size_bucket",
        "resnet_serve_padded_batch_size_sum",
        "resnet_serve_admission_wait_seconds_bucket",
        "resnet_serve_lane_busy_seconds_total",
    ):
        assert name in used, name
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))


def test_the_tracing_profile_receives_what_the_api_sends() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]["environment"]
    endpoint = api["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.endswith(":-http://jaeger:4318}")
    jaeger = compose["services"]["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert "4318" in jaeger["expose"]
    assert api["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"  # off unless asked
