"""The query ``POST /predict`` reads itself when the door answers it directly: what the route's
own validation would pass, and None (FastAPI then answers, 422 and all) for the rest."""

from __future__ import annotations

import pytest

from app.http.predict import MODEL_MAX, VERSION_MAX, _query


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", (None, None, None)),
        (b"top_k=3", (3, None, None)),
        (b"top_k=3&model=cats&version=2", (3, "cats", "2")),
        (b"model=caf%C3%A9", (None, "café", None)),  # percent-escapes as UTF-8, as Starlette
        (b"other=1", (None, None, None)),  # unknown parameters are ignored, as FastAPI does
        (b"model=" + b"m" * MODEL_MAX, (None, "m" * MODEL_MAX, None)),
    ],
)
def test_what_passes_is_read_here(raw: bytes, expected: tuple[object, ...]) -> None:
    assert _query(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"top_k=0",
        b"top_k=-1",
        b"top_k=two",
        b"top_k=",
        b"top_k=%EF%BC%93",  # a full-width digit: str.isdigit() says yes, int() too; FastAPI no
        b"top_k=1&top_k=2",
        b"model=" + b"m" * (MODEL_MAX + 1),
        b"version=" + b"v" * (VERSION_MAX + 1),
    ],
)
def test_the_rest_is_left_to_fastapi(raw: bytes) -> None:
    assert _query(raw) is None
