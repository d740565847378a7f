"""The Open Inference Protocol over gRPC on a real ``python -m app``, driven by Triton's own
clients (tritonclient.grpc, sync and asyncio) and, for what they never send (typed contents,
malformed messages), by this project's generated stub."""

from __future__ import annotations

import asyncio
import base64
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from app.grpc import inference_pb2 as pb
from app.grpc import inference_pb2_grpc as pb_grpc
from tests.helpers.metrics import scrape, status_counts, wait_for_gauge
from tests.helpers.models import CROP_SIZE, LABELS, image_bytes
from tests.helpers.server import Server, free_port, message_is, run_server
from tests.helpers.workers import start_workers

MODEL = "tiny-test"
IMAGES = [image_bytes(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def served(model_path: Path) -> Iterator[tuple[Server, str]]:
    port = free_port()
    with run_server(model_path, grpc_port=str(port), max_request_bytes="200000") as server:
        server.wait_for_log(message_is("ready"))
        yield server, f"127.0.0.1:{port}"


def stub_for(channel: grpc.Channel) -> Any:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def rest_top(url: str, data: bytes, k: int) -> list[tuple[int, float]]:
    files = [("files", ("x.png", data, "image/png"))]
    answer = httpx.post(f"{url}/predict", files=files, params={"top_k": k}, timeout=30)
    return [(p["class_id"], p["score"]) for p in answer.json()["results"][0]["predictions"]]


def images_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def test_health_and_metadata(served: tuple[Server, str]) -> None:
    client = triton.InferenceServerClient(served[1])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("nope")
    metadata = client.get_server_metadata()
    assert set(metadata.extensions) >= {"binary_tensor_data", "classification"}
    model = client.get_model_metadata(MODEL)
    assert model.inputs[0].name == "images"
    assert list(model.inputs[0].shape) == [-1, CROP_SIZE, CROP_SIZE, 3]
    assert list(model.outputs[0].shape) == [-1, len(LABELS)]


def test_bytes_and_classification_answer_as_predict_does(served: tuple[Server, str]) -> None:
    server, address = served
    client = triton.InferenceServerClient(address)
    top = triton.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer(MODEL, [images_input(IMAGES)], outputs=[top])
    full = client.infer(MODEL, [images_input(IMAGES)]).as_numpy("probabilities")
    assert result.get_response().model_name == MODEL
    assert full.shape == (len(IMAGES), len(LABELS))
    for row, data, probabilities in zip(
        result.as_numpy("probabilities"), IMAGES, full, strict=True
    ):
        expected = rest_top(server.url, data, 3)
        got = [(int(cell.split(b":")[1]), float(cell.split(b":")[0])) for cell in row]
        assert [c for c, _ in got] == [c for c, _ in expected]
        assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-6)
        assert np.allclose(probabilities[[c for c, _ in expected]], [s for _, s in expected])


def test_embedding_and_heatmap_answer_as_rest_does(served: tuple[Server, str]) -> None:
    server, address = served
    client = triton.InferenceServerClient(address)
    outputs = [triton.InferRequestedOutput(name) for name in ("embedding", "heatmap")]
    result = client.infer(
        MODEL, [images_input(IMAGES)], outputs=outputs, parameters={"class_id": 2}
    )
    over_rest = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        json={
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [len(IMAGES)],
                    "data": [base64.b64encode(data).decode() for data in IMAGES],
                }
            ],
            "outputs": [{"name": "embedding"}, {"name": "heatmap", "parameters": {"class_id": 2}}],
        },
    ).json()["outputs"]
    for name, rest in zip(("embedding", "heatmap"), over_rest, strict=True):
        got = result.as_numpy(name)
        assert list(got.shape) == rest["shape"]
        np.testing.assert_allclose(got.ravel(), rest["data"], atol=1e-6)


def test_uint8_crops_raw_and_typed_contents_agree(served: tuple[Server, str]) -> None:
    crops = np.random.default_rng(1).integers(0, 256, (2, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    client = triton.InferenceServerClient(served[1])
    tensor = triton.InferInput("images", list(crops.shape), "UINT8")
    tensor.set_data_from_numpy(crops)
    raw = client.infer(MODEL, [tensor]).as_numpy("probabilities")
    with grpc.insecure_channel(served[1]) as channel:
        stub = stub_for(channel)
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(
            name="images",
            datatype="UINT8",
            shape=list(crops.shape),
            contents=pb.InferTensorContents(uint_contents=crops.ravel().tolist()),
        )
        typed = stub.ModelInfer(request)
        images = pb.ModelInferRequest(model_name=MODEL)
        images.inputs.add(
            name="images",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=IMAGES[:1]),
        )
        from_bytes = stub.ModelInfer(images)
    values = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(raw.shape)
    assert np.allclose(values, raw, atol=1e-6)
    decoded = np.frombuffer(from_bytes.raw_output_contents[0], "<f4")
    expected = rest_top(served[0].url, IMAGES[0], 1)[0]
    assert int(decoded.argmax()) == expected[0]


@pytest.mark.parametrize(
    ("inputs", "code", "message"),
    [
        ([("images", [1], "FP32", b"\0" * 4)], "INVALID_ARGUMENT", "datatype 'FP32'"),
        ([("pixels", [1], "BYTES", b"")], "INVALID_ARGUMENT", "unknown input 'pixels'"),
        (
            [("images", [1, CROP_SIZE, CROP_SIZE, 3], "UINT8", b"\0" * 10)],
            "INVALID_ARGUMENT",
            "needs 768 values, got 10",
        ),
        ([("images", [2], "BYTES", b"\4\0\0\0abcd")], "INVALID_ARGUMENT", "shape [2] but 1"),
        ([("images", [1], "BYTES", b"\4\0\0\0abcd")], "INVALID_ARGUMENT", "not an image"),
        ([], "INVALID_ARGUMENT", "inputs"),
    ],
    ids=["datatype", "input-name", "byte-size", "element-count", "not-an-image", "no-inputs"],
)
def test_bad_requests_get_a_clear_status(
    served: tuple[Server, str],
    inputs: list[tuple[str, list[int], str, bytes]],
    code: str,
    message: str,
) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    for name, shape, datatype, raw in inputs:
        request.inputs.add(name=name, shape=shape, datatype=datatype)
        request.raw_input_contents.append(raw)
    with grpc.insecure_channel(served[1]) as channel, pytest.raises(grpc.RpcError) as raised:
        stub_for(channel).ModelInfer(request, timeout=30)
    assert raised.value.code().name == code
    assert message in str(raised.value.details())


def test_malformed_and_oversized_messages_and_unknown_models(served: tuple[Server, str]) -> None:
    path = "/inference.GRPCInferenceService/ModelInfer"
    with grpc.insecure_channel(served[1]) as channel:
        call = channel.unary_unary(path)  # bytes in, bytes out: no serialisation of ours
        with pytest.raises(grpc.RpcError) as malformed:
            call(b"\xff\xff\xff\xff garbage", timeout=30)
        with pytest.raises(grpc.RpcError) as oversized:
            call(b"\0" * 300_000, timeout=30)  # over max_request_bytes=200000
        stub = stub_for(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), timeout=30)
        alive = stub.ServerLive(pb.ServerLiveRequest(), timeout=30)
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ModelInferRequest message" in str(malformed.value.details())
    assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in str(unknown.value.details())
    assert alive.live  # and the server goes on


def test_the_asyncio_client_and_the_metrics(served: tuple[Server, str]) -> None:
    server, address = served

    async def run() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(address)
        try:
            results = await asyncio.gather(
                *(client.infer(MODEL, [images_input([data])]) for data in IMAGES)
            )
        finally:
            await client.close()
        return [result.as_numpy("probabilities") for result in results]

    before = status_counts(scrape(server.url), "/inference.GRPCInferenceService/ModelInfer")
    answers = asyncio.run(run())
    after = status_counts(scrape(server.url), "/inference.GRPCInferenceService/ModelInfer")
    assert [a.shape for a in answers] == [(1, len(LABELS))] * len(IMAGES)
    assert after.get("200", 0) - before.get("200", 0) == len(IMAGES)


def test_keys_guard_grpc_as_they_guard_http(model_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("grpc-key name=grpc-team\n")
    port = free_port()
    with run_server(model_path, grpc_port=str(port), api_keys_file=str(keys)) as server:
        server.wait_for_log(message_is("ready"))
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        live = client.is_server_live()  # probes are open
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [images_input(IMAGES[:1])])
        wrong = {"authorization": "Bearer nope"}
        with pytest.raises(InferenceServerException) as invalid:
            client.infer(MODEL, [images_input(IMAGES[:1])], headers=wrong)
        right = client.infer(MODEL, [images_input(IMAGES[:1])], headers={"x-api-key": "grpc-key"})
        metrics = scrape(server.url)
    assert live
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "an API key is required" in str(refused.value.message())
    assert invalid.value.status() == "StatusCode.UNAUTHENTICATED"
    assert right.as_numpy("probabilities").shape == (1, len(LABELS))
    # Counted under its key's name, as HTTP's requests are; refused calls are nobody's.
    counted = {
        (s.labels["caller"], s.labels["status"]): s.value
        for s in metrics["resnet_serve_caller_requests"].samples
        if s.name.endswith("_total")
    }
    assert counted == {("grpc-team", "200"): 1.0}


def test_the_standard_health_service_follows_readiness(served: tuple[Server, str]) -> None:
    path = "/grpc.health.v1.Health/Check"
    with grpc.insecure_channel(served[1]) as channel:
        check = channel.unary_unary(
            path,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        overall = check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        named = check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        with pytest.raises(grpc.RpcError) as unknown:
            check(health_pb2.HealthCheckRequest(service="other.Service"), timeout=30)
    assert overall.status == named.status == health_pb2.HealthCheckResponse.SERVING
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_two_workers_serve_grpc_on_the_one_port(model_path: Path) -> None:
    port = free_port()
    settings = {"workers": "2", "decode_threads": "1", "grpc_port": str(port)}
    with run_server(model_path, **settings) as server:
        start_workers(server)
        shapes = []
        for _ in range(16):  # a new connection each: the kernel spreads them over the workers
            client = triton.InferenceServerClient(f"127.0.0.1:{port}")
            shapes.append(
                client.infer(MODEL, [images_input(IMAGES[:1])]).as_numpy("probabilities").shape
            )
            client.close()
        answered_by: set[object] = set()

        def both(entry: dict[str, object]) -> bool:
            if entry.get("method") == "gRPC":
                answered_by.add(entry.get("worker"))
            return answered_by >= {0, 1}

        server.wait_for_log(both)
    assert shapes == [(1, len(LABELS))] * 16


def test_sigterm_finishes_the_calls_in_flight_and_refuses_new_ones(slow_model: Path) -> None:
    port = free_port()
    with run_server(slow_model, grpc_port=str(port)) as server:
        server.wait_for_log(message_is("ready"))
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.infer, MODEL, [images_input(IMAGES * 2)])
            wait_for_gauge(server.url, "resnet_serve_pending_images", len(IMAGES) * 2)
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_log(message_is("Shutting down"))
            late = triton.InferenceServerClient(f"127.0.0.1:{port}")
            with pytest.raises(InferenceServerException) as refused:
                late.infer(MODEL, [images_input(IMAGES[:1])])
            answer = in_flight.result(timeout=60)
        status = server.process.wait(timeout=60)
    assert answer.as_numpy("probabilities").shape == (len(IMAGES) * 2, len(LABELS))
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert status == 0


def test_admissions_refusals_are_resource_exhausted(slow_model: Path) -> None:
    port = free_port()
    settings = {
        "grpc_port": str(port),
        "request_timeout_ms": "400",
        "max_queue_images": "8",
        "max_images_per_request": "8",
    }
    big = images_input([image_bytes(seed, size=(64, 64)) for seed in range(8)])
    with run_server(slow_model, **settings) as server:
        server.wait_for_log(message_is("ready"))
        address = f"127.0.0.1:{port}"

        def call(_: int) -> InferenceServerException | None:
            client = triton.InferenceServerClient(address)
            try:
                client.infer(MODEL, [big])
            except InferenceServerException as exc:
                return exc
            finally:
                client.close()
            return None

        with ThreadPoolExecutor(8) as pool:
            flooded = list(pool.map(call, range(16)))
        metrics = scrape(server.url)
    statuses = {str(error.status()) for error in flooded if error is not None}
    assert "StatusCode.RESOURCE_EXHAUSTED" in statuses, flooded
    assert statuses <= {"StatusCode.RESOURCE_EXHAUSTED", "StatusCode.DEADLINE_EXCEEDED"}
    counted = status_counts(metrics, "/inference.GRPCInferenceService/ModelInfer")
    assert counted.get("503", 0) >= 1  # the refusals, counted as REST would count them


def test_the_clients_own_deadline_is_deadline_exceeded(slow_model: Path) -> None:
    port = free_port()
    big = images_input([image_bytes(seed, size=(64, 64)) for seed in range(8)])
    with run_server(slow_model, grpc_port=str(port)) as server:  # admits all 8: no refusal
        server.wait_for_log(message_is("ready"))
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        with pytest.raises(InferenceServerException) as late:
            client.infer(MODEL, [big], client_timeout=0.01)  # long before 8 images are done
        client.close()
    assert str(late.value.status()) == "StatusCode.DEADLINE_EXCEEDED"
