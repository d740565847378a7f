"""Errors of the serving layer; the image and model-file errors live in ``core.errors``."""

from __future__ import annotations

from core.errors import BadRequest, ServiceError


class InvalidMultipart(BadRequest):
    code = "invalid_multipart"


class OutputUnavailable(BadRequest):
    """A request for an output the model's file does not have (exported before it)."""

    code = "output_unavailable"


class UploadTimeout(ServiceError):
    status_code = 408
    code = "upload_timeout"


class InvalidParameter(ServiceError):
    status_code = 422
    code = "invalid_parameter"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class RepositoryUnavailable(NotReady):
    code = "repository_unavailable"


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


class UnknownModel(ServiceError):
    status_code = 404
    code = "model_not_found"


class RolloutConflict(ServiceError):
    """A rollout change the model's state refuses: one already runs, none runs, or the
    candidate cannot be compared with the baseline."""

    status_code = 409
    code = "rollout_conflict"


class RolloutNotFound(ServiceError):
    status_code = 404
    code = "rollout_not_found"


class ModelRequired(BadRequest):
    """A request that names no model where several are served and none is the default."""

    code = "model_required"


class GivenStatus(ServiceError):
    """An error whose status and code were decided elsewhere: a key check's refusal, another
    worker's answer to a repository change."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
