"""Errors that carry their HTTP status; one handler renders them as JSON (see ``app.handlers``).

Kept free of web-framework imports: ``app.preprocess`` raises these inside ``model/`` too.
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


class InvalidMultipart(BadRequest):
    code = "invalid_multipart"


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


class InvalidParameter(ServiceError):
    status_code = 422
    code = "invalid_parameter"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class ShuttingDown(NotReady):
    code = "shutting_down"


class DeadlineExceeded(ServiceError):
    status_code = 504
    code = "timeout"


class ClientClosedRequest(ServiceError):
    # nginx's non-standard 499: nobody reads it, but metrics and logs should say what happened.
    status_code = 499
    code = "client_closed_request"


class InferenceFailed(ServiceError):
    status_code = 500
    code = "inference_failed"
