"""The compose stack's health checks, load balancer and scrape config point at the app's real paths
and port, and the Redis override points the replicas at its service (the stack itself runs in
`make docker-test`, which needs Docker; Redis's config runs in test_deploy_redis.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PORT = Settings().port
GRPC_PORT = Settings().grpc_port
REDIS_PORT = 6379


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


def test_redis_is_shared_only_with_its_override_file() -> None:
    assert "redis" not in compose()["services"]
    assert not any("REDIS" in name for name in compose()["services"]["api"]["environment"])
    override = _override(ROOT / "docker-compose.redis.yml")["services"]
    redis, api = override["redis"], override["api"]
    url = urlsplit(api["environment"]["RESNET_SERVE_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", REDIS_PORT)
    assert api["depends_on"]["redis"]["condition"] == "service_started"  # never waited for
    assert "ports" not in redis  # the compose network only
    assert redis["expose"] == [str(REDIS_PORT)]
    assert "PONG" in redis["healthcheck"]["test"][-1]


def test_the_redis_image_runs_the_shipped_config() -> None:
    dockerfile = (ROOT / "docker" / "redis.Dockerfile").read_text()
    (copied,) = re.findall(r"^COPY redis\.conf (\S+)$", dockerfile, re.MULTILINE)
    assert f'ENTRYPOINT ["/usr/bin/redis-server", "{copied}"]' in dockerfile
    assert re.search(r"^USER 997:997$", dockerfile, re.MULTILINE)  # deploy/k8s runs it as 997
    config = (ROOT / "docker" / "redis.conf").read_text()
    assert re.search(rf"^port {REDIS_PORT}$", config, re.MULTILINE)
