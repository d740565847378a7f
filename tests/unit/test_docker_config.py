"""The compose stack's health checks, load balancer and scrape config point at the app's real paths
and port (the stack itself runs in `make docker-test`, which needs Docker)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PORT = Settings().port
GRPC_PORT = Settings().grpc_port


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_api_healthcheck_probes_readiness() -> None:
    paths = set(create_app(Settings()).openapi()["paths"])
    api = compose()["services"]["api"]
    assert api["healthcheck"]["test"][-1] == "/readyz"
    assert "/readyz" in paths
    assert api["expose"] == [str(PORT), str(GRPC_PORT)]


def test_load_balancer_checks_readiness_on_the_app_port() -> None:
    config = (ROOT / "docker" / "haproxy.cfg").read_text()
    assert re.search(r"option httpchk GET /readyz\n", config)
    assert re.search(rf"server-template api \d+-\d+ api:{PORT}\n", config)
    # gRPC passed through as TCP to each replica's gRPC port, up while its HTTP /readyz is 200.
    assert re.search(rf"bind :{GRPC_PORT}\n", config)
    assert re.search(rf"server-template api \d+-\d+ api:{GRPC_PORT}\n", config)
    assert re.search(rf"default-server check port {PORT} ", config)
    ports = compose()["services"]["lb"]["ports"]
    assert [port.rsplit(":", 1)[1] for port in ports] == [str(PORT), str(GRPC_PORT)]


def test_prometheus_discovers_every_api_replica() -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": PORT, "refresh_interval": "5s"}
    ]


def test_the_gpu_stack_builds_and_serves_fp16_and_the_cpu_stack_fp32() -> None:
    gpu = compose()["services"]["model"]
    cpu = _override(ROOT / "docker-compose.cpu.yml")["services"]["model"]
    assert gpu["build"]["args"]["MODEL_PRECISION"] == "fp16"
    assert cpu["build"]["args"]["MODEL_PRECISION"] == "fp32"
    assert gpu["image"] != cpu["image"]  # neither build overwrites the other's model image
    assert "BASE_IMAGE" in gpu["build"]["args"]  # the shared build arguments still apply
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'python -m model build --precision "$MODEL_PRECISION"' in dockerfile
    assert compose()["services"]["api"]["environment"]["RESNET_SERVE_MODEL_PATH"] == (
        "/models/model.onnx"
    )


class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (``!reset``, ``!override``) read as plain values."""


_ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _override(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=_ComposeLoader)
    return loaded
