"""The Open Inference Protocol's recipe, once, for every transport: inference, readiness, metadata
and the repository's index, load and unload. REST (app.oip.rest) and gRPC (app.grpc.service) only
translate their wire format to these calls and back.

Inference goes through the pipeline ``/predict`` uses (app.pipeline.pipeline), with the raw rows
as its head: the protocol answers with the outputs, ranked per output where the request asks for
``classification``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from app.batching.deadline import parse_timeout_ms, remaining_s, set_timeout
from app.errors import InvalidParameter
from app.oip.codec import OutputTensor
from app.oip.protocol import (
    InferenceRequest,
    ModelMetadataResponse,
    RequestInput,
    ServerMetadataResponse,
    TensorMetadata,
)
from app.oip.tensors import (
    OUTPUTS,
    encoded_images,
    image_urls,
    output_tensor,
    takes_urls,
    the_input,
    uint8_crops,
    wanted_outputs,
)
from app.pipeline.heads import Row, Rows
from app.pipeline.pipeline import Image
from app.repository.link import Change, raise_refusal
from app.repository.models import Entry
from app.repository.policy import VersionPolicy
from app.repository.route import Route
from app.service import NAME, VERSION, Service
from core.contract import INPUT_NAME
from core.errors import BadRequest

# Triton's name for an ONNX file on ONNX Runtime; on OpenVINO the same form: "openvino_onnx".
PLATFORM = "{backend}_onnx"
EXTENSIONS = ["binary_tensor_data", "classification"]
# How a transport waits for the pipeline's work: until its client goes away, or its deadline.
Wait = Callable[[Awaitable[list[Row]]], Awaitable[list[Row]]]


def server_metadata() -> ServerMetadataResponse:
    return ServerMetadataResponse(name=NAME, version=VERSION, extensions=EXTENSIONS)


def check_model_ready(service: Service, name: str, version: str | None) -> None:
    """Raises (404, 503) unless a version of the model is ready and the server admits work."""
    service.models.resolve(name, version)
    service.lifecycle.check_admitting()


def model_metadata(service: Service, name: str, version: str | None) -> ModelMetadataResponse:
    models = service.models
    served = models.resolve(name, version)
    metadata = served.metadata
    crop = metadata.recipe.crop_size
    return ModelMetadataResponse(
        name=served.name,
        versions=[version] if version is not None else models.versions(name),
        platform=PLATFORM.format(backend=served.model.backend),
        # The graph's input; BYTES [-1] of encoded images is accepted under the same name.
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="UINT8", shape=[-1, crop, crop, 3])],
        outputs=[
            TensorMetadata(name=name, datatype="FP32", shape=[-1, *served.model.shapes[source]])
            for name, source in OUTPUTS.items()
            if source in served.model.outputs
        ],
    )


async def infer(
    service: Service,
    route: Route,
    inference: InferenceRequest,
    parts: list[bytes | None],
    wait: Wait,
) -> tuple[dict[str, Any], list[OutputTensor]]:
    """The answer's header and the outputs the request asked for. ``parts``: each input's binary
    data (None where it came as JSON); ``wait``: the transport's way of awaiting the work."""
    spec, binary = the_input(inference, parts)
    set_timeout(protocol_timeout_ms(inference))
    metadata = route.served.metadata
    wanted = wanted_outputs(inference, metadata.num_classes)
    class_ids = [w.class_id for w in wanted if w.name == "heatmap"]
    head = Rows(frozenset(w.source for w in wanted), class_ids[0] if class_ids else -1)
    if spec.datatype == "BYTES":
        work = route.images(await _images(service, spec, binary), head, lambda _: head)
    else:
        crops = uint8_crops(spec, binary, metadata.recipe.crop_size, service.limits)
        work = route.crops(crops, head, lambda _: head)
    answered = await wait(work)
    served = route.served  # the version that answered: its labels name the classes
    metadata = served.metadata
    header: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    if inference.id is not None:
        header["id"] = inference.id
    return header, [output_tensor(metadata, answered, one) for one in wanted]


async def _images(service: Service, spec: RequestInput, binary: bytes | None) -> list[Image]:
    """A BYTES input's images: its elements, or fetched from the URLs they are."""
    if not takes_urls(spec):
        return [Image(None, data) for data in encoded_images(spec, binary, service.limits)]
    urls = image_urls(spec, binary, service.limits)
    fetched = await service.fetcher.fetch_all(urls, f"input {spec.name!r}: element")
    return [Image(url, data) for url, data in zip(urls, fetched, strict=True)]


def protocol_timeout_ms(inference: InferenceRequest) -> float | None:
    """The request's ``timeout`` parameter, in microseconds as Triton's (tritonclient's
    ``timeout=``), in ms; None where it has none. A deadline of its own sooner than a
    transport's (gRPC's) is kept: the sooner one wins in the pipeline."""
    given = inference.parameters.get("timeout")
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, int | float):
        raise InvalidParameter(f"parameters.timeout={given!r} is not a number of microseconds")
    milliseconds = parse_timeout_ms(str(given / 1000), "parameters.timeout (in microseconds)")
    left = remaining_s()
    return milliseconds if left is None or milliseconds < left * 1000 else None


def index(service: Service, ready_only: bool) -> list[Entry]:
    return [e for e in service.models.index() if not ready_only or e.state == "READY"]


async def load(service: Service, name: str, policy: VersionPolicy | None) -> None:
    """Every worker brings ``name`` to ``policy``; BadRequest names each version that failed
    (the ones serving go on)."""
    change = Change("load", name, str(policy) if policy is not None else None)
    outcomes = await service.change_repository(change)
    raise_refusal(outcomes)
    failed = sorted({failure for outcome in outcomes for failure in outcome.failed})
    if failed:
        reasons = "; ".join(f"version {version}: {reason}" for version, reason in failed)
        serving = service.models.versions(name)
        raise BadRequest(f"failed to load {name!r} ({reasons}); serving {serving}")


async def unload(service: Service, name: str) -> None:
    raise_refusal(await service.change_repository(Change("unload", name)))


def policy_from_config(config: Any) -> VersionPolicy | None:
    """Triton's model config (a JSON string): only its ``version_policy`` means anything here."""
    if config is None:
        return None
    try:
        parsed = json.loads(config) if isinstance(config, str) else None
        policy = parsed.get("version_policy") if isinstance(parsed, dict) else None
    except ValueError:
        policy = None
    try:
        return _parsed_policy(policy)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _parsed_policy(policy: Any) -> VersionPolicy:
    if policy is None:
        raise BadRequest(
            'parameters.config must be a JSON object string with a "version_policy", e.g. '
            '{"version_policy": {"specific": {"versions": [1]}}}'
        )
    if isinstance(policy, dict) and len(policy) == 1:
        ((kind, rule),) = policy.items()
        if kind == "all" and rule in ({}, None):
            return VersionPolicy("all")
        if kind == "latest" and isinstance(rule, dict):
            return VersionPolicy.parse(f"latest:{rule.get('num_versions', 1)}")
        if kind == "specific" and isinstance(rule, dict) and rule.get("versions"):
            versions = ",".join(str(v) for v in rule["versions"])
            return VersionPolicy.parse(f"specific:{versions}")
    raise BadRequest(f"version_policy {json.dumps(policy)} is not latest, all or specific")
