"""The Grafana dashboard (deploy/k8s/dashboard/resnet-serve.json): the compose stack and Kubernetes
(rendered by kubectl's kustomize) ship the same file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers.k8s import DASHBOARD, dashboard, render

ROOT = Path(__file__).resolve().parents[2]


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
