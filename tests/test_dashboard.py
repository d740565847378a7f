"""The Grafana dashboard (deploy/k8s/dashboard/resnet-serve.json): it parses, every query names
metrics the app exposes, and the compose stack and Kubernetes ship the same file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from app.telemetry.metrics import Metrics
from tests.test_deploy_k8s import render

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "k8s" / "dashboard" / "resnet-serve.json"
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


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


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


def test_compose_and_kubernetes_ship_the_same_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provider = yaml.safe_load((ROOT / "docker" / "grafana" / "dashboards.yml").read_text())
    # The folder Grafana loads dashboards from is the one that holds this file.
    (source,) = [
        src for src, dst in mounts.items() if dst == provider["providers"][0]["options"]["path"]
    ]
    assert (ROOT / source).resolve() == DASHBOARD.parent
    sources = yaml.safe_load((ROOT / "docker" / "grafana" / "datasources.yml").read_text())
    prometheus = next(s for s in sources["datasources"] if s["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    (configmap,) = render("dashboard")
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["resnet-serve.json"]) == dashboard()


def test_the_tracing_profile_receives_what_the_api_sends() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]["environment"]
    endpoint = api["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.endswith(":-http://jaeger:4318}")
    jaeger = compose["services"]["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert "4318" in jaeger["expose"]
    assert api["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"  # off unless asked
