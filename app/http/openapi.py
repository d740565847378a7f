"""OpenAPI fragments FastAPI cannot infer: the /predict body and every error response."""

from __future__ import annotations

from typing import Any

from app.http.schemas import ErrorResponse

MODEL_REQUIRED = (
    "`model_required`: no model named, and several are served with no default_model to answer"
)
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "`empty_upload`: no file, or an empty one. `invalid_multipart`: malformed multipart"
        " body, a form field that is not a file, or more files than max_images_per_request. "
        f"{MODEL_REQUIRED}",
        401: "`unauthorized`: no API key, or not one of the keys (only when api_keys_file is set)",
        403: "`url_not_allowed`: an image URL whose host or address url_allow does not allow"
        " (or url_allow is empty)",
        413: "`payload_too_large`: over max_request_bytes or max_image_bytes."
        " `too_many_pixels`: over max_image_pixels (read from the image header)",
        404: "`model_not_found`: no ready version of the model (or version) named",
        415: "`unsupported_media_type`: not multipart/form-data or image/*, or the bytes are not"
        " an allowed image format (detected from the bytes, not the name)",
        422: "`invalid_image`: corrupt or truncated image."
        " `invalid_parameter`: top_k or another query parameter out of range."
        " `url_fetch_failed`: an image URL that did not answer 200 in time",
        500: "`inference_failed`: the model failed on the batch holding this request",
        503: "`overloaded`, `not_ready`, `shutting_down`: queue full, warming up or draining",
        504: "`timeout`: waited in the queue past request_timeout_ms; the model was not run",
    }.items()
}
ERRORS[503]["headers"] = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
}
# Bounds that depend on settings and the model (maxItems, top_k's maximum) are filled in by
# app.http.schema_bounds when the document is first built.
_IMAGE = {"type": "string", "format": "binary", "minLength": 1}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": _IMAGE,
                            "minItems": 1,
                            "description": "One file part per image, each non-empty; any field"
                            " name is accepted, every part must be a file",
                        }
                    },
                    "additionalProperties": False,
                },
                "encoding": {"files": {"contentType": "image/*"}},
            },
            "image/*": {"schema": _IMAGE},
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["urls"],
                    "properties": {
                        "urls": {
                            "type": "array",
                            "items": {"type": "string", "format": "uri", "minLength": 1},
                            "minItems": 1,
                            "description": "Images the server fetches (http, https), from the "
                            "hosts url_allow lists only (docs/security.md)",
                        }
                    },
                    "additionalProperties": False,
                }
            },
        },
    }
}
