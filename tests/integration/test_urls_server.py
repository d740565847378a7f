"""Images by URL on a real server (``/predict``'s ``{"urls": [...]}``, the protocol's BYTES input
of ``content_type: "url"``, over REST and gRPC), fetched from a local image server on 127.0.0.1
(the ``images`` fixture) that the tests allow explicitly; every refused address is refused before
any connection (never contacted)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from app.grpc import inference_pb2 as pb
from app.grpc import inference_pb2_grpc as pb_grpc
from app.oip.codec import join_bytes, split_bytes
from tests.helpers.image_site import PNG
from tests.helpers.server import Server, free_port, message_is, run_server

INFER = "/v2/models/tiny-test/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"
K = 3


@contextmanager
def serving(model_path: Path, allow: str, **more: str) -> Iterator[Server]:
    settings = {"url_allow": allow, "url_timeout_ms": "1000", "max_image_bytes": "200000"}
    with run_server(model_path, **settings, **more) as server:
        server.wait_for_log(message_is("ready"))
        yield server


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def allowed(model_path: Path, grpc_port: int) -> Iterator[Server]:
    with serving(model_path, '["127.0.0.1"]', grpc_port=str(grpc_port)) as server:
        yield server


def urls(server: Server, *asked: str, path: str = "/predict") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"urls": list(asked)}, timeout=30)


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    message: str = body["message"]
    return message


def test_an_allowed_url_classifies_like_the_upload(allowed: Server, images: str) -> None:
    upload = httpx.post(f"{allowed.url}/predict", files={"f": ("d.png", PNG, "image/png")})
    asked = (f"{images}/digit.png", f"{images}/to//digit.png")  # directly, and by a redirect
    response = urls(allowed, *asked)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == list(asked)
    expected = upload.json()["results"][0]["predictions"]
    assert all(r["predictions"] == expected for r in results)
    embedded = urls(allowed, f"{images}/digit.png", path="/embed")
    assert embedded.status_code == 200, embedded.text


def test_private_addresses_are_refused_unless_named(
    allowed: Server, model_path: Path, images: str
) -> None:
    port = images.rsplit(":", 1)[1]
    # Allowed by name, refused by address: localhost resolves to loopback, which no entry names.
    with serving(model_path, '["localhost", "*.example.com", "*"]') as server:
        message = error(urls(server, f"http://localhost:{port}/digit.png"), 403, "url_not_allowed")
        assert "resolves to 127.0.0.1" in message
        for address in ("127.0.0.1", "169.254.169.254", "10.1.2.3", "[::1]"):
            refused = urls(server, f"http://{address}:{port}/digit.png")
            assert "not in url_allow" in error(refused, 403, "url_not_allowed")
    redirects = (
        f"{images}/to/http://169.254.169.254/latest/meta-data/",  # the cloud metadata address
        f"{images}/to/http://10.1.2.3/x.png",
        f"{images}/to/http://localhost:{port}/digit.png",
    )
    for redirect in redirects:  # each hop is checked again
        error(urls(allowed, redirect), 403, "url_not_allowed")
    for other in (f"ftp://127.0.0.1:{port}/digit.png", f"http://example.com:{port}/digit.png"):
        error(urls(allowed, other), 403, "url_not_allowed")


def test_a_slow_url_is_cut_and_the_server_serves_meanwhile(allowed: Server, images: str) -> None:
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(urls(allowed, f"{images}/slow.png")))
    slow.start()
    time.sleep(0.2)
    assert httpx.get(f"{allowed.url}/healthz").status_code == 200
    assert not answers  # answered while the fetch was still waiting: the loop is not blocked
    slow.join()
    assert "url_timeout_ms=1000" in error(answers[0], 422, "url_fetch_failed")


def test_what_is_too_large_not_an_image_or_missing_gets_its_4xx(
    allowed: Server, images: str
) -> None:
    assert "max_image_bytes=200000" in error(
        urls(allowed, f"{images}/huge.png"), 413, "payload_too_large"
    )
    error(urls(allowed, f"{images}/notes.txt"), 415, "unsupported_media_type")
    assert "HTTP 404" in error(urls(allowed, f"{images}/gone.png"), 422, "url_fetch_failed")
    message = error(
        urls(allowed, f"{images}/digit.png", f"{images}/gone.png"), 422, "url_fetch_failed"
    )
    assert message.startswith("url 1: ")  # which of the request's URLs


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"urls": []}, 400, "empty_upload"),
        ({"urls": "http://127.0.0.1/x.png"}, 400, "bad_request"),
        ({"urls": [1]}, 400, "bad_request"),
        ({"urls": ["http://127.0.0.1/x.png"], "more": 1}, 400, "bad_request"),
        ({"urls": ["http://127.0.0.1/x.png"] * 17}, 400, "bad_request"),
    ],
)
def test_a_json_body_must_be_a_list_of_urls(
    allowed: Server, body: object, status: int, code: str
) -> None:
    response = httpx.post(f"{allowed.url}/predict", json=body, timeout=30)
    error(response, status, code)


def test_urls_are_off_without_url_allow(server: Server, images: str) -> None:
    message = error(urls(server, f"{images}/digit.png"), 403, "url_not_allowed")
    assert "off" in message


def test_v1_models_says_whether_urls_are_on_not_where_from(allowed: Server, server: Server) -> None:
    listed = httpx.get(f"{allowed.url}/v1/models", timeout=30)
    assert listed.json()["images_by_url"] is True
    assert "127.0.0.1" not in listed.text  # the allow list stays the operator's
    assert httpx.get(f"{server.url}/v1/models", timeout=30).json()["images_by_url"] is False


def url_input(*asked: str, binary: bool = False) -> tuple[bytes, dict[str, str]]:
    """A protocol request whose BYTES input holds URLs, as JSON strings or binary elements, asking
    for the top-K classes."""
    tensor: dict[str, object] = {"name": "images", "datatype": "BYTES", "shape": [len(asked)]}
    parameters: dict[str, object] = {"content_type": "url"}
    blob = join_bytes(url.encode() for url in asked)
    if binary:
        parameters["binary_data_size"] = len(blob)
    else:
        tensor["data"] = list(asked)
    outputs = [{"name": "probabilities", "parameters": {"classification": K}}]
    header = json.dumps({"inputs": [tensor | {"parameters": parameters}], "outputs": outputs})
    if not binary:
        return header.encode(), {"Content-Type": "application/json"}
    return header.encode() + blob, {HEADER_LENGTH: str(len(header))}


def infer_urls(server: Server, *asked: str, binary: bool = False) -> httpx.Response:
    body, headers = url_input(*asked, binary=binary)
    return httpx.post(f"{server.url}{INFER}", content=body, headers=headers, timeout=30)


def protocol_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]
    return message


def top_k(server: Server) -> list[str]:
    """What /predict ranks for the image at /digit.png, as the protocol's classification."""
    files = {"f": ("d.png", PNG, "image/png")}
    answer = httpx.post(f"{server.url}/predict", files=files, params={"top_k": K}, timeout=30)
    best = answer.json()["results"][0]["predictions"]
    return [f"{p['score']:f}:{p['class_id']}:{p['label']}" for p in best]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_the_protocol_fetches_a_url_input_as_predict_does(
    allowed: Server, images: str, binary: bool
) -> None:
    asked = (f"{images}/digit.png", f"{images}/to//digit.png")
    response = infer_urls(allowed, *asked, binary=binary)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, K])
    assert output["data"] == top_k(allowed) * 2


def test_the_protocol_refuses_urls_as_predict_does(allowed: Server, images: str) -> None:
    port = images.rsplit(":", 1)[1]
    refused = infer_urls(allowed, f"{images}/digit.png", f"http://example.com:{port}/digit.png")
    message = protocol_error(refused, 403)
    assert message.startswith("input 'images': element 1: ")
    assert "host 'example.com' is not in url_allow" in message
    redirected = infer_urls(allowed, f"{images}/to/http://169.254.169.254/latest/meta-data/")
    assert "not in url_allow" in protocol_error(redirected, 403)
    assert "HTTP 404" in protocol_error(infer_urls(allowed, f"{images}/gone.png"), 422)
    assert "not an image" in protocol_error(infer_urls(allowed, f"{images}/notes.txt"), 415)


def test_the_protocols_urls_are_off_without_url_allow(server: Server, images: str) -> None:
    message = protocol_error(infer_urls(server, f"{images}/digit.png"), 403)
    assert "images by URL are off: url_allow (RESNET_SERVE_URL_ALLOW) is empty" in message


def test_grpc_takes_the_same_url_input(allowed: Server, images: str, grpc_port: int) -> None:
    def request(url: str) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="tiny-test")
        tensor = message.inputs.add(name="images", datatype="BYTES", shape=[1])
        tensor.parameters["content_type"].string_param = "url"
        tensor.contents.bytes_contents.append(url.encode())
        output = message.outputs.add(name="probabilities")
        output.parameters["classification"].int64_param = K
        return message

    port = images.rsplit(":", 1)[1]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        answer = stub.ModelInfer(request(f"{images}/digit.png"), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request(f"http://example.com:{port}/digit.png"), timeout=30)
    ranked = split_bytes(answer.raw_output_contents[0], "probabilities")
    assert [element.decode() for element in ranked] == top_k(allowed)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not in url_allow" in str(refused.value.details())
