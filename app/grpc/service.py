"""The Open Inference Protocol's gRPC service on the pipeline every API shares: each call is
checked for its key, admitted, traced, counted and logged as an HTTP request is, and its errors
are the REST side's, each mapped to the gRPC status a client expects (``STATUS``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from app.batching.deadline import set_timeout
from app.edge.access import Access, KeyRefused, check_key
from app.edge.limits import RateLimited
from app.edge.requests import MODEL_VERSION_HEADER, Caller, RequestIds, by_address, caller
from app.errors import ClientClosedRequest, DeadlineExceeded, Overloaded
from app.grpc import inference_pb2 as pb
from app.grpc.tensors import parameters, to_request, to_response
from app.oip import serving
from app.repository.sources import check_name
from app.service import Service
from app.telemetry.logs import request_id
from app.telemetry.tracing import end_status, trace_id
from core.errors import BadRequest, ServiceError

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
PROBES = ("/ServerLive", "/ServerReady", f"{HEALTH}/Check")  # logged at debug, as /readyz
T = TypeVar("T")
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
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return STATUS.get(error.status_code, grpc.StatusCode.UNKNOWN)


class InferenceService:
    """Each method of the service as a handler of raw bytes (``handlers``): a message that does
    not parse is INVALID_ARGUMENT like any other bad request, counted and logged."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.ids = RequestIds("grpc-")

    # -- what each call does --------------------------------------------------------------------

    async def _live(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _ready(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        try:
            self.service.check_ready()
        except ServiceError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def _model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            serving.check_model_ready(self.service, request.name, request.version or None)
        except ServiceError:  # unknown, warming or draining
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _server(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        described = serving.server_metadata()
        return pb.ServerMetadataResponse(
            name=described.name, version=described.version, extensions=described.extensions
        )

    async def _metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        described = serving.model_metadata(self.service, request.name, request.version or None)
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
        service = self.service
        route = service.route(message.model_name, message.model_version or None)
        left = context.time_remaining()  # the client's deadline, None without one
        set_timeout(left * 1000 if left is not None else None)
        with service.tracing.timed("admission"):
            ticket = await service.admission.enter()
        with ticket, route.hold():
            request, parts = to_request(message)

            async def within_deadline(work: Awaitable[T]) -> T:
                try:
                    async with asyncio.timeout(context.time_remaining()):  # the client's own
                        return await work
                except TimeoutError:
                    raise DeadlineExceeded(
                        "the call's deadline passed before it was answered"
                    ) from None

            header, outputs = await serving.infer(service, route, request, parts, within_deadline)
        return to_response(header["model_name"], header["model_version"], request, outputs)

    async def _index(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in serving.index(self.service, request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state.value, reason=entry.reason
            )
        return response

    async def _load(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        policy = serving.policy_from_config(parameters(request.parameters).get("config"))
        await serving.load(self.service, check_name(request.model_name), policy)
        return pb.RepositoryModelLoadResponse()

    async def _unload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await serving.unload(self.service, check_name(request.model_name))
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
        rid = self.ids(metadata.get(b"x-request-id", b"").decode("latin-1"))
        token = request_id.set(rid)
        status, started = 200, time.perf_counter()
        who: Caller | None = None  # once its key is accepted
        answered_by: str | None = None  # the model version that answered an inference

        def describe() -> tuple[str, dict[str, str]]:
            service, method = path[1:].rsplit("/", 1)
            return path[1:], {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        service = self.service
        with service.tracing.request(metadata, describe) as span:
            try:
                who = self._caller(access, metadata, context)
                caller.set(who)
                limit = None
                if access is Access.INFERENCE:  # before its message is even parsed
                    limit = await service.rate_limits.check(who)
                try:
                    request = kind.FromString(raw)
                except DecodeError as exc:
                    raise BadRequest(f"malformed {kind.__name__} message: {exc}") from None
                response = await handler(request, context)
                answered_by = getattr(response, "model_version", None) or None
                trailers = [("x-request-id", rid)]
                if limit is not None:
                    trailers += [(name.lower(), value) for name, value in limit.headers().items()]
                if answered_by is not None:  # an inference's, in the metadata as over HTTP
                    trailers.append((MODEL_VERSION_HEADER, answered_by))
                    if span is not None:
                        span.set_attribute("resnet_serve.model_version", answered_by)
                context.set_trailing_metadata(tuple(trailers))
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
                service.request_log.record(
                    path,
                    "gRPC",
                    path,
                    status,
                    seconds,
                    traced,
                    path.endswith(PROBES),
                    counted,
                    answered_by,
                )
                request_id.reset(token)

    def _caller(
        self, access: Access, metadata: Mapping[bytes, bytes], context: grpc.aio.ServicerContext
    ) -> Caller:
        """Who the call is for, by its key (raises its refusal) or, with keys off, its peer."""
        try:
            found = check_key(access, metadata, self.service.key_files)
        except KeyRefused as refused:
            self.service.metrics.auth_refused.labels(reason=refused.reason).inc()
            raise
        # The peer is "ipv4:host:port": a client's connections share its address.
        return found or by_address(context.peer().rpartition(":")[0])


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


# The refusals' headers that mean the same in gRPC metadata.
_PASSED_ON = frozenset({"Retry-After", "RateLimit", "RateLimit-Policy"})


def _trailers(error: ServiceError, rid: str) -> tuple[tuple[str, str], ...]:
    trailers = [("x-request-id", rid)]
    for name, value in error.headers.items():
        if name in _PASSED_ON:
            trailers.append((name.lower(), value))
    retry_after = error.headers.get("Retry-After")
    if retry_after is not None:
        # gRPC's own retry pushback (milliseconds): a rate limit knows it to the millisecond.
        pushback = error.retry_ms if isinstance(error, RateLimited) else int(retry_after) * 1000
        trailers.append(("grpc-retry-pushback-ms", str(pushback)))
    return tuple(trailers)
