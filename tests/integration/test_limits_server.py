"""Per-key rate limits on real servers: one process (REST and gRPC), two workers, and two servers
sharing one Debian redis-server that is stopped and started under them (tests/unit/
test_app_limits.py: the algorithm)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from app.grpc import inference_pb2 as pb
from app.grpc import inference_pb2_grpc as pb_grpc
from tests.helpers.metrics import scrape
from tests.helpers.models import image_bytes
from tests.helpers.redis import redis_server
from tests.helpers.server import Server, free_port, message_is, run_server
from tests.helpers.workers import start_workers

PNG = image_bytes(3)
# One request per 2 s on average: a test's few requests all land inside one interval.
KEYS = "slow-key name=slow rate=0.5 burst={burst}\nfree-key name=free\nwarm-key rate=1000\n"


def predict(url: str, key: str, client: httpx.Client | None = None) -> httpx.Response:
    files = [("files", ("a.png", PNG, "image/png"))]
    post = client.post if client is not None else httpx.post
    return post(f"{url}/predict", files=files, headers={"X-API-Key": key}, timeout=60)


def fresh_connection(url: str, key: str) -> httpx.Response:
    """One request on a connection of its own: with workers, the kernel picks one per
    connection."""
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return predict(url, key, client)


def counted(metrics: dict[str, object], family: str, label: str) -> dict[str, float]:
    return {
        s.labels[label]: s.value
        for s in metrics[family].samples  # type: ignore[attr-defined]
        if s.name.endswith("_total")
    }


def test_a_key_over_its_rate_gets_429_with_the_ietf_headers_and_another_key_does_not(
    model_path: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEYS.format(burst=2))
    grpc_port = free_port()
    with run_server(model_path, api_keys_file=str(keys), grpc_port=str(grpc_port)) as server:
        server.wait_for_log(message_is("ready"))
        slow = [predict(server.url, "slow-key") for _ in range(3)]
        free = [predict(server.url, "free-key") for _ in range(3)]
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tiny-test", [], headers={"x-api-key": "slow-key"})
        metrics = scrape(server.url)
    assert [r.status_code for r in slow] == [200, 200, 429]
    assert [r.status_code for r in free] == [200, 200, 200]
    first, second, over = slow
    assert first.headers["RateLimit-Policy"] == '"key";q=2;w=4'
    assert first.headers["RateLimit"] == '"key";r=1;t=2'
    assert second.headers["RateLimit"] == '"key";r=0;t=4'
    assert over.json()["error"]["code"] == "rate_limited"
    assert "0.5 requests per second (a burst of 2)" in over.json()["error"]["message"]
    # Answered after rate_limit_delay_ms (1 s), which the waits it names have shrunk by: the
    # next request fits 2 s after the second, so 1 s after this refusal.
    assert over.elapsed.total_seconds() >= 1.0
    assert over.headers["Retry-After"] == "1"
    assert over.headers["RateLimit"] == '"key";r=0;t=3'
    assert "RateLimit" not in free[0].headers  # unlimited keys are told nothing
    # gRPC shares the key's bucket, and is refused before its (empty) message is even looked at.
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert counted(metrics, "resnet_serve_rate_limited", "caller") == {"slow": 2.0}
    by_caller = {
        (s.labels["caller"], s.labels["status"]): s.value
        for s in metrics["resnet_serve_caller_requests"].samples
        if s.name.endswith("_total")
    }
    assert by_caller[("slow", "429")] == 2
    assert by_caller[("free", "200")] == 3


def test_grpc_refusal_carries_the_retry_pushback(model_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEYS.format(burst=1))
    grpc_port = free_port()
    with run_server(model_path, api_keys_file=str(keys), grpc_port=str(grpc_port)) as server:
        server.wait_for_log(message_is("ready"))
        assert predict(server.url, "slow-key").status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.ModelInfer.with_call
            with pytest.raises(grpc.RpcError) as refused:
                call(pb.ModelInferRequest(), metadata=(("x-api-key", "slow-key"),), timeout=30)
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(error.trailing_metadata())
    assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= 1000  # 2 s less the 1 s it waited
    assert trailers["ratelimit-policy"] == '"key";q=1;w=2'


def test_two_workers_hold_one_limit_for_the_server(model_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEYS.format(burst=6))
    settings = {"workers": "2", "rate_limit_delay_ms": "0"}  # refusals at once: a quick test
    with run_server(model_path, api_keys_file=str(keys), **settings) as server:
        start_workers(server)
        statuses = [fresh_connection(server.url, "slow-key").status_code for _ in range(12)]
        server.wait_for_log(message_is("request"))  # the access log says which worker answered
        answered_by = _workers_answering(server)
    assert statuses.count(200) == 6, statuses
    assert statuses.count(429) == 6, statuses
    assert answered_by == {0, 1}  # both workers took connections, and counted in one bucket


def _workers_answering(server: Server) -> set[int]:
    workers = set()
    while not server.lines.empty():
        server.seen.append(server.lines.get_nowait())
    for entry in server.seen:
        if entry.get("message") == "request" and entry.get("path") == "/predict":
            workers.add(int(str(entry["worker"])))
    return workers


def test_two_servers_sharing_redis_hold_one_limit_and_serve_on_when_it_stops(
    model_path: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEYS.format(burst=4))
    with redis_server(tmp_path) as redis:
        settings = {"api_keys_file": str(keys), "redis_url": redis.url, "rate_limit_delay_ms": "0"}
        with run_server(model_path, **settings) as one, run_server(model_path, **settings) as two:
            one.wait_for_log(message_is("ready"))
            two.wait_for_log(message_is("ready"))
            shared = [predict(server.url, "slow-key").status_code for server in (one, two) * 3]
            redis.stop()
            # Redis gone: every request is answered, each server limiting on its own.
            alone = [predict(server.url, "free-key").status_code for server in (one, two) * 2]
            limited = [predict(one.url, "slow-key").status_code for _ in range(6)]
            down = scrape(one.url)
            one.wait_for_log(message_is("redis does not answer"))
            redis.start()  # empty: the slow key's burst is whole again
            for server in (one, two):
                wait_until_shared(server)
            again = [predict(server.url, "slow-key").status_code for server in (one, two) * 3]
            up = scrape(one.url)
    assert shared == [200, 200, 200, 200, 429, 429], shared  # 4 for both servers together
    assert alone == [200] * 4
    assert limited == [200, 200, 200, 200, 429, 429], limited  # one's own bucket
    assert down["resnet_serve_redis_up"].samples[0].value == 0
    assert counted(down, "resnet_serve_redis_errors", "use")["limits"] >= 1
    assert again == [200, 200, 200, 200, 429, 429], again
    assert up["resnet_serve_redis_up"].samples[0].value == 1


def wait_until_shared(server: Server) -> None:
    """Until ``server`` counts its limits in Redis again (past its rest after a failure)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert predict(server.url, "warm-key").status_code == 200
        if scrape(server.url)["resnet_serve_redis_up"].samples[0].value == 1:
            return
        time.sleep(0.2)
    raise AssertionError("the server never used Redis again")
