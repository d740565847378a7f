"""The Open Inference Protocol's gRPC service on the pipeline every API shares: each call is
checked for its key, admitted, traced, counted and logged as an HTTP request is, and its errors
are the REST side's, each mapped to the gRPC status a client expects (``STATUS``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from app.batching.admission import Ticket
from app.edge.callers import Caller, by_address, caller
from app.errors import ClientClosedRequest, DeadlineExceeded, GivenStatus, Overloaded
from app.grpc import inference_pb2 as pb
from app.grpc.tensors import parameters, to_request, to_response
from app.http.auth import Refused, check_key
from app.http.context import SAFE_ID
from app.http.routes import check_ready
from app.http.routing import Access
from app.oip.repository import load_model, policy_from_config, unload_model
from app.oip.rest import EXTENSIONS, describe
from app.oip.tensors import encoded_images, output_tensor, the_input, uint8_crops, wanted_outputs
from app.pipeline.pipeline import Image
from app.repository.models import Models
from app.repository.sources import check_name
from app.repository.version import ServedModel
from app.telemetry.logs import request_id
from app.telemetry.tracing import end_status, trace_id
from core.errors import BadRequest, ServiceError

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
PROBES = ("/ServerLive", "/ServerReady", f"{HEALTH}/Check")  # logged at debug, as /readyz
M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)
# The REST side's statuses as gRPC's. 503 is UNAVAILABLE while warming or draining (retry on
# another replica) and RESOURCE_EXHAUSTED when admission sheds load (retry later, here: the
# retry hint is in the trailing metadata); 413 is the request's own size, INVALID_ARGUMENT.
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_ID_PREFIX = "grpc-" + os.urandom(6).hex() + "-"
_ID_COUNTER = itertools.count(1)


def status_of(error: ServiceError) -> grpc.StatusCode:
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return STATUS.get(error.status_code, grpc.StatusCode.UNKNOWN)


class InferenceService:
    """Each method of the service as a handler of raw bytes (``handlers``): a message that does
    not parse is INVALID_ARGUMENT like any other bad request, counted and logged."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state

    # -- what each call does --------------------------------------------------------------------

    async def _live(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _ready(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        try:
            check_ready(self.state.lifecycle, self.state.models)
        except ServiceError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def _model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._models.resolve(request.name, request.version or None)
            self.state.lifecycle.check_admitting()
        except ServiceError:  # unknown, warming or draining
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _server(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=self.app.title, version=self.app.version, extensions=EXTENSIONS
        )

    async def _metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        described = describe(self._models, request.name, request.version or None)
        response = pb.ModelMetadataResponse(
            name=described.name, versions=described.versions, platform=described.platform
        )
        for tensor in described.inputs:
            response.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for tensor in described.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        return response

    async def _infer(
        self, message: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        served = self._models.resolve(message.model_name, message.model_version or None)
        with self.state.tracing.timed("admission"):
            ticket = await self.state.admission.enter()
        try:
            with served.hold():
                return await self._run(served, message, ticket, context)
        finally:
            ticket.release()

    async def _run(
        self,
        served: ServedModel,
        message: pb.ModelInferRequest,
        ticket: Ticket,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelInferResponse:
        classifier, limits = served.classifier, self.state.upload_limits
        request, parts = to_request(message)
        spec, binary = the_input(request, parts)
        wanted = wanted_outputs(request, classifier.metadata.num_classes)
        if spec.datatype == "BYTES":
            images = [Image(None, data) for data in encoded_images(spec, binary, limits)]
            work: Awaitable[Any] = classifier.classify(images, ticket)
        else:
            crop = classifier.metadata.recipe.crop_size
            work = classifier.infer(uint8_crops(spec, binary, crop, limits), ticket)
        remaining = context.time_remaining()
        try:
            async with asyncio.timeout(remaining):  # the client's own deadline
                probabilities = await work
        except TimeoutError:
            raise DeadlineExceeded("the call's deadline passed before it was answered") from None
        outputs = [output_tensor(classifier, probabilities, one) for one in wanted]
        return to_response(served.name, served.version, request, outputs)

    async def _index(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self._models.index():
            if request.ready and entry.state != "READY":
                continue
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state.value, reason=entry.reason
            )
        return response

    async def _load(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        policy = policy_from_config(parameters(request.parameters).get("config"))
        name = check_name(request.model_name)
        await load_model(self.state.change_repository, self._models, name, policy)
        return pb.RepositoryModelLoadResponse()

    async def _unload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await unload_model(self.state.change_repository, check_name(request.model_name))
        return pb.RepositoryModelUnloadResponse()

    # -- every call ------------------------------------------------------------------------------

    def handlers(self) -> grpc.GenericRpcHandler:
        calls = {
            "ServerLive": (pb.ServerLiveRequest, Access.PROBE, self._live),
            "ServerReady": (pb.ServerReadyRequest, Access.PROBE, self._ready),
            "ModelReady": (pb.ModelReadyRequest, Access.API, self._model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, Access.OPEN, self._server),
            "ModelMetadata": (pb.ModelMetadataRequest, Access.API, self._metadata),
            "ModelInfer": (pb.ModelInferRequest, Access.INFERENCE, self._infer),
            "RepositoryIndex": (pb.RepositoryIndexRequest, Access.REPOSITORY, self._index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, Access.REPOSITORY, self._load),
            "RepositoryModelUnload": (
                pb.RepositoryModelUnloadRequest,
                Access.REPOSITORY,
                self._unload,
            ),
        }
        methods = {
            name: grpc.unary_unary_rpc_method_handler(
                self._bound(name, *call), response_serializer=_serialize
            )
            for name, call in calls.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def health(self) -> grpc.GenericRpcHandler:
        """gRPC's standard health service (grpc.health.v1), which Kubernetes' gRPC probes and
        grpc_health_probe call: SERVING as /readyz is 200, for "" and this service."""
        check = (health_pb2.HealthCheckRequest, Access.PROBE, self._health)
        methods = {
            "Check": grpc.unary_unary_rpc_method_handler(
                self._bound("Check", *check, service=HEALTH), response_serializer=_serialize
            )
        }
        return grpc.method_handlers_generic_handler(HEALTH, methods)

    async def _health(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE):
            raise UnknownService(
                f"unknown service {request.service!r}: this server has {SERVICE!r}"
            )
        ready = (await self._ready(pb.ServerReadyRequest(), context)).ready
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    def _bound(
        self,
        method: str,
        kind: type[Message],
        access: Access,
        handler: Any,
        service: str = SERVICE,
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
        path = f"/{service}/{method}"

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            return await self._call(path, access, context, handler, kind, raw)

        return call

    @property
    def _models(self) -> Models:
        models: Models = self.state.models
        return models

    async def _call(
        self,
        path: str,
        access: Access,
        context: grpc.aio.ServicerContext,
        handler: Callable[[M, grpc.aio.ServicerContext], Awaitable[R]],
        kind: type[M],
        raw: bytes,
    ) -> R:
        """``handler``'s answer to ``raw`` parsed as ``kind``, or an abort with the status its
        error maps to; the call's key, request id, span, metrics and access log line."""
        metadata = _metadata(context)
        given = metadata.get(b"x-request-id", b"").decode("latin-1")
        rid = given if SAFE_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
        token = request_id.set(rid)
        status, started = 200, time.perf_counter()
        who: Caller | None = None  # once its key is accepted

        def describe() -> tuple[str, dict[str, str]]:
            service, method = path[1:].rsplit("/", 1)
            return path[1:], {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        with self.state.tracing.request(metadata, describe) as span:
            try:
                refused = check_key(access, metadata, self.state.key_files)
                if isinstance(refused, Refused):
                    self.state.metrics.auth_refused.labels(reason=refused.reason).inc()
                    raise GivenStatus(refused.status, refused.code, refused.message)
                # The peer is "ipv4:host:port": a client's connections share its address.
                who = refused or by_address(context.peer().rpartition(":")[0])
                caller.set(who)
                try:
                    request = kind.FromString(raw)
                except DecodeError as exc:
                    raise BadRequest(f"malformed {kind.__name__} message: {exc}") from None
                response = await handler(request, context)
                context.set_trailing_metadata((("x-request-id", rid),))
                return response
            except ServiceError as error:
                status = error.status_code
                end_status(span, status, error.code, error.message)
                await context.abort(status_of(error), error.message, _trailers(error, rid))
                raise AssertionError("grpc's abort returns only by raising") from None
            except asyncio.CancelledError:  # the client went away, or its deadline passed
                status = ClientClosedRequest.status_code
                raise
            except Exception:  # our fault: logged with its traceback, the client told only that
                status = 500
                log.exception("unhandled error", extra={"path": path})
                end_status(span, status, "internal_error", "internal server error")
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
                raise AssertionError("grpc's abort returns only by raising") from None
            finally:
                if status == 200:
                    end_status(span, status, None, None)
                seconds, traced = time.perf_counter() - started, trace_id(span)
                counted = who if access is Access.INFERENCE else None
                self.state.request_log.record(
                    path, "gRPC", path, status, seconds, traced, path.endswith(PROBES), counted
                )
                request_id.reset(token)


def _serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class UnknownService(ServiceError):
    status_code = 404
    code = "service_not_found"


def _metadata(context: grpc.aio.ServicerContext) -> Mapping[bytes, bytes]:
    """The call's metadata as HTTP headers are held (lower-case bytes)."""
    found: dict[bytes, bytes] = {}
    for key, value in context.invocation_metadata() or ():
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        found[key.lower().encode("latin-1")] = raw
    return found


def _trailers(error: ServiceError, rid: str) -> tuple[tuple[str, str], ...]:
    trailers = [("x-request-id", rid)]
    retry_after = error.headers.get("Retry-After")
    if retry_after is not None:
        # Both the HTTP hint and gRPC's own retry pushback (milliseconds).
        trailers += [("retry-after", retry_after), ("grpc-retry-pushback-ms", f"{retry_after}000")]
    return tuple(trailers)
