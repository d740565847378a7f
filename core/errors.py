"""Errors that carry their HTTP status, raised below the web layer (decoding, model files).

Framework-free: the trainer's data loader and the exporter meet these too. ``app.http.handlers``
renders every ``ServiceError`` as the one JSON error shape.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class EmptyUpload(BadRequest):
    code = "empty_upload"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class TooManyPixels(PayloadTooLarge):
    code = "too_many_pixels"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidImage(ServiceError):
    status_code = 422
    code = "invalid_image"


class ModelError(Exception):
    """A model file, checkpoint, dataset or option that cannot be used: one line for the operator.

    The server exits 1 with it before serving; ``python -m model`` exits 1 with it.
    """
