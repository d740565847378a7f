"""A corpus of hostile and unusual uploads: each invalid one gets its documented 4xx JSON error,
each valid-but-odd one a sensible 200, and the server is still healthy after all of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Serve
from tests.helpers.models import LABELS, image_bytes, offline_top
from tests.helpers.server import message_is, run_server
from tests.helpers.uploads import (
    MULTIPART,
    animated_gif,
    blocks,
    encode,
    exif_rotated_jpeg,
    gif_declaring,
    huge_metadata_jpeg,
    multipart,
    palette_with_transparency,
    png_declaring,
    sixteen_bit_png,
)

pytestmark = pytest.mark.anyio

JPEG = encode(blocks(1), "JPEG", quality=95)
PNG = image_bytes(2)


@dataclass(frozen=True)
class Bad:
    body: bytes | None
    content_type: str | None
    status: int
    code: str
    params: dict[str, str] = field(default_factory=dict)


def raw(data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    return data, content_type


def part(data: bytes, filename: str = "x.png") -> tuple[bytes, str]:
    return multipart((filename, data)), MULTIPART


def bad(body_type: tuple[bytes, str], status: int, code: str, **params: str) -> Bad:
    return Bad(body_type[0], body_type[1], status, code, params)


RANDOM = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
BAD = {
    "empty-body": Bad(None, None, 400, "empty_upload"),
    "empty-raw-image": bad(raw(b""), 400, "empty_upload"),
    "zero-byte-file": bad(part(b""), 400, "empty_upload"),
    "random-bytes-raw": bad(raw(RANDOM), 415, "unsupported_media_type"),
    "random-bytes-file": bad(part(RANDOM, "r.bin"), 415, "unsupported_media_type"),
    "text-named-jpg": bad(
        part(b"hello, I am text\n" * 10, "photo.jpg"), 415, "unsupported_media_type"
    ),
    "text-as-image-jpeg": bad(raw(b"plain text", "image/jpeg"), 415, "unsupported_media_type"),
    "truncated-jpeg": bad(raw(JPEG[: len(JPEG) // 2], "image/jpeg"), 422, "invalid_image"),
    "truncated-png": bad(raw(PNG[: len(PNG) // 2]), 422, "invalid_image"),
    "jpeg-header-only": bad(raw(JPEG[:200], "image/jpeg"), 422, "invalid_image"),
    "png-signature-only": bad(raw(PNG[:8]), 415, "unsupported_media_type"),
    "png-bomb-100000x100000": bad(raw(png_declaring(100_000, 100_000)), 413, "too_many_pixels"),
    "gif-bomb-65535x65535": bad(
        raw(gif_declaring(65_535, 65_535), "image/gif"), 413, "too_many_pixels"
    ),
    "png-7000x7000-over-pixel-limit": bad(
        raw(png_declaring(7_000, 7_000, rows=7_000)), 413, "too_many_pixels"
    ),
    # JSON is {"urls": [...]} (images by URL): an image sent as JSON does not parse as one.
    "image-sent-as-json": bad(raw(PNG, "application/json"), 400, "bad_request"),
    "wrong-content-type-text": bad(raw(PNG, "text/plain"), 415, "unsupported_media_type"),
    "form-urlencoded": bad(
        raw(b"a=1", "application/x-www-form-urlencoded"), 415, "unsupported_media_type"
    ),
    "multipart-without-boundary": bad(
        raw(multipart((None, PNG)), "multipart/form-data"), 400, "invalid_multipart"
    ),
    "multipart-wrong-boundary": bad(
        raw(multipart(("a.png", PNG)), "multipart/form-data; boundary=other"),
        400,
        "invalid_multipart",
    ),
    "multipart-garbage": bad(raw(RANDOM, MULTIPART), 400, "invalid_multipart"),
    "multipart-text-field": bad(raw(multipart((None, b"hi")), MULTIPART), 400, "invalid_multipart"),
    "17-parts-over-16": bad(
        raw(multipart(*[("a.png", PNG)] * 17), MULTIPART), 400, "invalid_multipart"
    ),
    "one-bad-among-good": bad(
        raw(multipart(("a.png", PNG), ("b.png", PNG[:50])), MULTIPART), 422, "invalid_image"
    ),
    "top-k-0": bad(part(PNG), 422, "invalid_parameter", top_k="0"),
    "top-k-minus-1": bad(part(PNG), 422, "invalid_parameter", top_k="-1"),
    "top-k-1e9": bad(part(PNG), 422, "invalid_parameter", top_k=str(10**9)),
    "top-k-abc": bad(part(PNG), 422, "invalid_parameter", top_k="abc"),
    "top-k-huge-int": bad(part(PNG), 422, "invalid_parameter", top_k="9" * 400),
}

UPRIGHT = blocks(11, size=(48, 32))
GRAY = blocks(12, mode="L")
GIF_FRAMES = (blocks(13), blocks(14), blocks(15))
TRAVERSAL = ("../../etc/passwd", "..\\..\\windows\\win.ini", "/etc/shadow", "a/../../b.png")
NON_ASCII = ("фото кота.png", "写真.jpg", "🐱.png", "café;x=1.png")
# name -> (upload, filename, an image that must get the same prediction, or None)
GOOD: dict[str, tuple[bytes, str, bytes | None]] = {
    "1x1-png": (encode(blocks(3, size=(1, 1)), "PNG"), "a.png", None),
    "1x1-jpeg": (encode(blocks(3, size=(1, 1)), "JPEG"), "a.jpg", None),
    "1x5000-strip": (encode(blocks(4, size=(1, 5000)), "PNG"), "a.png", None),
    "cmyk-jpeg": (encode(blocks(5, mode="CMYK"), "JPEG", quality=95), "a.jpg", None),
    "16-bit-png": (sixteen_bit_png(GRAY), "a.png", encode(GRAY, "PNG")),
    "grayscale-png": (encode(GRAY, "PNG"), "a.png", encode(GRAY.convert("RGB"), "PNG")),
    "grayscale-jpeg": (encode(GRAY, "JPEG"), "a.jpg", None),
    "palette-png-with-transparency": (palette_with_transparency(blocks(6)), "a.png", None),
    "rgba-opaque-png": (encode(blocks(7, mode="RGBA"), "PNG"), "a.png", encode(blocks(7), "PNG")),
    "la-png": (encode(blocks(8, mode="LA"), "PNG"), "a.png", None),
    "animated-gif": (animated_gif(*GIF_FRAMES), "a.gif", encode(GIF_FRAMES[0], "PNG")),
    "bmp": (encode(blocks(9), "BMP"), "a.bmp", encode(blocks(9), "PNG")),
    "webp-lossless": (
        encode(blocks(10), "WEBP", lossless=True),
        "a.webp",
        encode(blocks(10), "PNG"),
    ),
    "tiff": (encode(blocks(16), "TIFF"), "a.tif", encode(blocks(16), "PNG")),
    # Lossy, like a phone's photo: the same top-1 as the PNG, scores within JPEG-like noise.
    "avif": (encode(blocks(18), "AVIF", quality=90), "a.avif", encode(blocks(18), "PNG")),
    "heic": (encode(blocks(19), "HEIF", quality=90), "a.heic", encode(blocks(19), "PNG")),
    **{
        f"exif-orientation-{o}": (
            exif_rotated_jpeg(UPRIGHT, o),
            "a.jpg",
            encode(UPRIGHT, "JPEG", quality=95),
        )
        for o in (3, 6, 8)
    },
    "huge-exif-and-icc": (
        huge_metadata_jpeg(blocks(17)),
        "a.jpg",
        encode(blocks(17), "JPEG", quality=95),
    ),
    **{f"traversal-{i}": (PNG, name, PNG) for i, name in enumerate(TRAVERSAL)},
    **{f"non-ascii-{i}": (PNG, name, PNG) for i, name in enumerate(NON_ASCII)},
}


def assert_error_shape(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


async def post_bad(client: httpx.AsyncClient, case: Bad) -> httpx.Response:
    headers = {"content-type": case.content_type} if case.content_type else {}
    return await client.post("/predict", content=case.body, headers=headers, params=case.params)


async def post_good(client: httpx.AsyncClient, data: bytes, filename: str) -> httpx.Response:
    return await client.post(
        "/predict", content=multipart((filename, data)), headers={"content-type": MULTIPART}
    )


def top_classes(response: httpx.Response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    return [(p["class_id"], p["score"]) for p in result["predictions"]]


def assert_sensible(response: httpx.Response, filename: str) -> None:
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["filename"] == filename
    predictions = result["predictions"]
    assert len(predictions) == 5
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) <= 1.0 + 1e-5
    assert all(p["label"] == LABELS[p["class_id"]] for p in predictions)


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
async def test_invalid_upload_gets_its_4xx_error(serve: Serve, case: Bad) -> None:
    async with serve() as client:
        response = await post_bad(client, case)
    assert_error_shape(response, case.status, case.code)


async def test_an_image_pillow_refuses_itself_is_refused_with_the_configured_limit(
    serve: Serve,
) -> None:
    async with serve() as client:  # 10^10 pixels: over Pillow's own 178,956,970 too
        response = await post_bad(client, BAD["png-bomb-100000x100000"])
    assert_error_shape(response, 413, "too_many_pixels")
    message = response.json()["error"]["message"]
    assert "10000000000 pixels, over the limit of 40000000 (max_image_pixels)" in message
    assert "178956970" not in message


@pytest.mark.parametrize(("data", "filename", "same_as"), GOOD.values(), ids=GOOD.keys())
async def test_unusual_valid_upload_gets_a_sensible_200(
    serve: Serve, data: bytes, filename: str, same_as: bytes | None
) -> None:
    async with serve() as client:
        response = await post_good(client, data, filename)
        reference = await post_good(client, same_as, "ref.png") if same_as is not None else None
    assert_sensible(response, filename)
    if reference is not None:
        got, expected = top_classes(response), top_classes(reference)
        assert got[0][0] == expected[0][0]
        assert np.allclose([s for _, s in got], [s for _, s in expected], atol=0.05)


async def test_filenames_are_echoed_never_opened(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from an empty directory: a filename used as a path would create or read something here.
    monkeypatch.chdir(tmp_path)
    names = [*TRAVERSAL, *NON_ASCII]
    body = multipart(*[(name, PNG) for name in names])
    async with serve() as client:
        response = await client.post("/predict", content=body, headers={"content-type": MULTIPART})
    assert response.status_code == 200, response.text
    assert [r["filename"] for r in response.json()["results"]] == names
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240


def test_real_server_survives_the_whole_corpus(model_path: Path) -> None:
    with run_server(model_path, max_batch_size="4") as server:
        server.wait_for_log(message_is("ready"))
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for name, case in BAD.items():
                headers = {"content-type": case.content_type} if case.content_type else {}
                response = client.post(
                    "/predict", content=case.body, headers=headers, params=case.params
                )
                assert response.status_code == case.status, (name, response.text)
                assert response.json()["error"]["code"] == case.code, name
            for name, (data, filename, _) in GOOD.items():
                response = client.post(
                    "/predict",
                    content=multipart((filename, data)),
                    headers={"content-type": MULTIPART},
                )
                assert response.status_code == 200, (name, response.text)
            assert client.get("/readyz").status_code == 200
            normal = client.post("/predict", content=PNG, headers={"content-type": "image/png"})
            survived = server.process.poll() is None
    assert survived
    got, expected = top_classes(normal), offline_top(model_path, PNG, 5)
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
