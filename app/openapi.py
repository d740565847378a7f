"""OpenAPI fragments FastAPI cannot infer: the /predict body and every error response."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Empty or missing upload, malformed multipart body",
        413: "Over max_request_bytes, max_image_bytes or max_image_pixels",
        415: "Not multipart/image content, or not an allowed image format",
        422: "Corrupt or truncated image, or an invalid query parameter",
        500: "Inference failed for the batch holding this request",
        503: "Overloaded, warming up or shutting down; see Retry-After",
        504: "Waited in the queue past request_timeout_ms",
    }.items()
}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                },
                "encoding": {"files": {"contentType": "image/*"}},
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
