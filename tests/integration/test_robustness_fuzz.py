"""Property-based fuzzing of /predict on a real server: never a 500, always the error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.models import image_bytes
from tests.helpers.server import message_is, run_server
from tests.helpers.uploads import BOUNDARY, blocks, encode

SEEDS = [
    image_bytes(0),
    encode(blocks(1), "JPEG"),
    encode(blocks(2), "GIF"),
    encode(blocks(3), "WEBP"),
    encode(blocks(4), "BMP"),
]
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# HTTP clients refuse header values with surrounding whitespace, so the fuzz never sends them.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(
    str.strip
)


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


payloads = st.one_of(st.binary(max_size=512), mutated_image(), st.sampled_from(SEEDS))
content_types = st.one_of(
    st.sampled_from(
        [
            "image/png",
            "image/jpeg",
            "image/",
            "IMAGE/PNG; charset=x",
            "multipart/form-data",
            f"multipart/form-data; boundary={BOUNDARY}",
            "application/octet-stream",
            "",
        ]
    ),
    header_text,
)
top_ks = st.one_of(
    st.none(),
    st.integers(-(10**12), 10**12).map(str),
    st.text(max_size=12),
)


@st.composite
def multipart_body(draw: st.DrawFn) -> bytes:
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["files", "file", "", 'a"b']))
        filename = draw(st.one_of(st.none(), st.text(max_size=20).filter(_header_safe)))
        disposition = draw(st.sampled_from(["form-data", "attachment", "garbage"]))
        head = f'Content-Disposition: {disposition}; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"'
        part_type = draw(st.sampled_from(["image/png", "text/plain", ""]))
        if part_type:
            head += f"\r\nContent-Type: {part_type}"
        body += f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + draw(payloads) + b"\r\n"
    closing = draw(st.sampled_from([f"--{BOUNDARY}--\r\n", f"--{BOUNDARY}", ""]))
    return body + closing.encode()


def _header_safe(text: str) -> bool:
    return not any(c in text for c in '\r\n"\x00')


@pytest.fixture(scope="module")
def server_url(model_path: Path) -> Iterator[str]:
    with run_server(model_path, max_images_per_request="3", max_queue_images="8") as server:
        server.wait_for_log(message_is("ready"))
        yield server.url
        assert server.process.poll() is None


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        assert response.json()["results"]
        return
    assert 400 <= response.status_code < 500
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]


@FUZZ
@given(body=st.one_of(payloads, multipart_body()), content_type=content_types, top_k=top_ks)
def test_fuzzed_predict_is_never_a_500(
    server_url: str, body: bytes, content_type: str, top_k: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    params = {"top_k": top_k} if top_k is not None else {}
    response = httpx.post(
        f"{server_url}/predict", content=body, headers=headers, params=params, timeout=30
    )
    check(response)


@FUZZ
@given(body=multipart_body(), top_k=top_ks)
def test_fuzzed_multipart_parts_are_never_a_500(
    server_url: str, body: bytes, top_k: str | None
) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    params = {"top_k": top_k} if top_k is not None else {}
    response = httpx.post(
        f"{server_url}/predict", content=body, headers=headers, params=params, timeout=30
    )
    check(response)


def test_server_is_ready_after_fuzzing(server_url: str) -> None:
    assert httpx.get(f"{server_url}/readyz", timeout=10).status_code == 200
    response = httpx.post(
        f"{server_url}/predict", content=SEEDS[0], headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
