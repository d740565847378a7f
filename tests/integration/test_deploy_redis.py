"""Redis as the compose stack and Kubernetes run it: Debian's redis-server with the image's
docker/redis.conf and the options each adds (docker-compose.redis.yml, components/redis), a cache
of the size given that writes nothing to disk and, full, drops old keys instead of refusing new."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
import yaml

from tests.helpers.k8s import ROOT, render
from tests.helpers.redis import memory_bytes, redis_server

CONFIG = ROOT / "docker" / "redis.conf"
DEFAULT = re.compile(r"\$\{\w+:-([^}]*)\}")  # compose's ${NAME:-default}


def compose_options() -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.redis.yml").read_text())
    return [DEFAULT.sub(r"\1", option) for option in compose["services"]["redis"]["command"]]


def kubernetes_options() -> list[str]:
    (deployment,) = [
        doc
        for doc in render("overlays/cpu-redis")
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "resnet-serve-redis"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    options: list[str] = container["args"]
    return options


@pytest.mark.parametrize(
    "options", [compose_options(), kubernetes_options()], ids=["compose", "kubernetes"]
)
def test_redis_runs_as_a_cache_of_the_size_given(options: list[str], tmp_path: Path) -> None:
    with redis_server(tmp_path, (str(CONFIG), *options)) as server:
        config = redis.Redis.from_url(server.url, decode_responses=True).config_get("*")
    maxmemory = memory_bytes(options[options.index("--maxmemory") + 1])
    assert config["maxmemory"] == str(maxmemory)
    assert config["maxmemory-policy"] == "allkeys-lru"
    assert config["save"] == ""
    assert config["appendonly"] == "no"


def test_a_full_redis_drops_old_keys_and_takes_every_write(tmp_path: Path) -> None:
    value = b"x" * 300  # about a top-5 answer
    with redis_server(tmp_path, (str(CONFIG), "--maxmemory", "2mb")) as server:
        client = redis.Redis.from_url(server.url)
        for start in range(0, 20_000, 1000):
            pipeline = client.pipeline(transaction=False)
            for key in range(start, start + 1000):
                pipeline.set(f"answer:{key}", value, ex=3600)
            assert all(pipeline.execute())  # an OOM error would come back here
        assert client.info("stats")["evicted_keys"] > 0
        assert client.dbsize() < 20_000
        assert client.get("answer:19999") == value  # the newest stay
        client.shutdown()  # as on `docker stop` (SIGTERM): with no persistence, nothing saved
    assert not any(tmp_path.iterdir())
