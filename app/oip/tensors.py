"""Protocol tensors <-> the pipeline's inputs and answers, under the same limits as /predict.

The model's one input takes two datatypes, as OpenVINO Model Server does: BYTES ``[N]`` of
encoded images (decoded by our preprocessing) or UINT8 ``[N, S, S, 3]`` of preprocessed crops.
A BYTES input whose ``parameters.content_type`` is ``"url"`` holds image URLs instead, one per
element, which the server fetches as it fetches /predict's (app.edge.fetch).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import InvalidParameter
from app.oip.codec import OutputTensor, split_bytes
from app.oip.protocol import InferenceRequest, RequestInput
from app.pipeline.heads import Classify, Row
from app.pipeline.pipeline import UploadLimits
from core.contract import (
    CLASS_MAP_NAME,
    EMBEDDING_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OUTPUT_NAME,
    ModelMetadata,
)
from core.errors import BadRequest, EmptyUpload, PayloadTooLarge

INPUT_DATATYPES = ("BYTES", "UINT8")
# An input's parameters.content_type where its BYTES elements are URLs to fetch (MLServer's name
# for the parameter that says how a tensor's data is encoded).
URL = "url"
# The protocol's outputs, by the model output each is read from (core.contract): ``heatmap`` is
# the class activation map, [N, h, w] at the map's own resolution (7x7 for a 224x224 ResNet-50),
# of the output's ``class_id`` parameter, or of each image's top class.
OUTPUTS = {
    OUTPUT_NAME: OUTPUT_NAME,
    LOGITS_NAME: LOGITS_NAME,
    EMBEDDING_NAME: EMBEDDING_NAME,
    "heatmap": CLASS_MAP_NAME,
}


@dataclass(frozen=True)
class Wanted:
    """One output the request asked for, by name: binary or JSON, and ``classification`` top-k
    (of the probabilities) or all of it; ``class_id`` for a heatmap (-1: the top class)."""

    name: str
    binary: bool
    classification: int
    class_id: int = -1

    @property
    def source(self) -> str:
        """The model output it is read from."""
        return OUTPUTS[self.name]


def the_input(
    request: InferenceRequest, parts: list[bytes | None]
) -> tuple[RequestInput, bytes | None]:
    """The request's one input and its binary data, checked against the model's input."""
    if len(request.inputs) != 1:
        raise BadRequest(
            f"the model takes exactly 1 input ({INPUT_NAME!r}), got {len(request.inputs)}"
        )
    spec = request.inputs[0]
    if spec.name != INPUT_NAME:
        raise BadRequest(f"unknown input {spec.name!r}: the model's input is {INPUT_NAME!r}")
    if spec.datatype not in INPUT_DATATYPES:
        raise BadRequest(
            f"input {spec.name!r}: datatype {spec.datatype!r} is not one of {INPUT_DATATYPES}"
        )
    if parts[0] is not None and spec.data is not None:
        raise BadRequest(f"input {spec.name!r} has both data and binary_data_size")
    _check_content_type(spec)
    return spec, parts[0]


def encoded_images(spec: RequestInput, binary: bytes | None, limits: UploadLimits) -> list[bytes]:
    """BYTES ``[N]``: binary elements, or JSON strings holding base64 (JSON cannot carry bytes)."""
    if len(spec.shape) != 1:
        raise BadRequest(f"input {spec.name!r}: BYTES takes shape [N], got {spec.shape}")
    _check_count(spec, limits)
    what = f"input {spec.name!r}"
    elements = split_bytes(binary, what) if binary is not None else _base64(spec)
    if len(elements) != spec.shape[0]:
        raise BadRequest(f"{what}: shape {spec.shape} but {len(elements)} elements were sent")
    for index, element in enumerate(elements):
        if not element:
            raise EmptyUpload(f"{what}: element {index} is empty (0 bytes)")
        if len(element) > limits.max_image_bytes:
            raise PayloadTooLarge(
                f"{what}: element {index} has {len(element)} bytes, "
                f"over max_image_bytes={limits.max_image_bytes}"
            )
    return elements


def takes_urls(spec: RequestInput) -> bool:
    """Whether the input's elements are URLs to fetch (checked by the_input)."""
    return spec.parameters.get("content_type") == URL


def image_urls(spec: RequestInput, binary: bytes | None, limits: UploadLimits) -> list[str]:
    """BYTES ``[N]`` of URLs: binary UTF-8 elements, or JSON strings."""
    if len(spec.shape) != 1:
        raise BadRequest(f"input {spec.name!r}: BYTES takes shape [N], got {spec.shape}")
    _check_count(spec, limits)
    what = f"input {spec.name!r}"
    if binary is not None:
        elements: list[Any] = split_bytes(binary, what)
    elif spec.data is not None:
        elements = spec.data
    else:
        raise BadRequest(f"{what} has neither data nor binary_data_size")
    if len(elements) != spec.shape[0]:
        raise BadRequest(f"{what}: shape {spec.shape} but {len(elements)} elements were sent")
    return [_url(what, index, element) for index, element in enumerate(elements)]


def uint8_crops(
    spec: RequestInput, binary: bytes | None, crop_size: int, limits: UploadLimits
) -> list[np.ndarray]:
    """UINT8 ``[N, S, S, 3]`` RGB crops, channels last, as the model takes them."""
    expected = [crop_size, crop_size, 3]
    if len(spec.shape) != 4 or spec.shape[1:] != expected:
        raise BadRequest(
            f"input {spec.name!r}: UINT8 takes shape [N, {crop_size}, {crop_size}, 3], "
            f"got {spec.shape}"
        )
    _check_count(spec, limits)
    size = int(np.prod(spec.shape))
    values = np.frombuffer(binary, np.uint8) if binary is not None else _json_uint8(spec)
    if values.size != size:
        raise BadRequest(
            f"input {spec.name!r}: shape {spec.shape} needs {size} values, got {values.size}"
        )
    return list(values.reshape(spec.shape))


def wanted_outputs(request: InferenceRequest, num_classes: int) -> list[Wanted]:
    default = request.parameters.get("binary_data_output", False)
    if type(default) is not bool:
        raise InvalidParameter(f"binary_data_output={default!r} is not a boolean")
    if not request.outputs:
        # None named: the probabilities, which every model has. (Triton answers every output;
        # here that would compute every image's embedding and heatmap for clients that never
        # asked for them.)
        return [Wanted(OUTPUT_NAME, default, 0)]
    # The heatmaps' class: the output's class_id, or the request's (tritonclient sets parameters
    # per request only).
    shared = request.parameters.get("class_id", -1)
    wanted = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            served = ", ".join(map(repr, OUTPUTS))
            raise BadRequest(f"unknown output {output.name!r}: the model's outputs are {served}")
        binary = output.parameters.get("binary_data", default)
        k = output.parameters.get("classification", 0)
        class_id = output.parameters.get("class_id", shared if output.name == "heatmap" else -1)
        if output.name != "heatmap" and class_id != -1:
            raise InvalidParameter(f"output {output.name!r}: class_id applies to 'heatmap' only")
        if type(class_id) is not int or not -1 <= class_id < num_classes:
            raise InvalidParameter(
                f"output {output.name!r}: class_id={class_id!r} is out of range "
                f"0..{num_classes - 1} (the classes)"
            )
        if type(binary) is not bool:
            raise InvalidParameter(
                f"output {output.name!r}: binary_data={binary!r} is not a boolean"
            )
        if output.name != OUTPUT_NAME and k != 0:
            raise InvalidParameter(
                f"output {output.name!r}: classification ranks {OUTPUT_NAME!r} only"
            )
        if type(k) is not int or not 0 <= k <= num_classes:
            raise InvalidParameter(
                f"output {output.name!r}: classification={k!r} is out of range 0..{num_classes} "
                "(the classes)"
            )
        wanted.append(Wanted(output.name, binary, k, class_id))
    if len({w.class_id for w in wanted if w.name == "heatmap"}) > 1:
        raise InvalidParameter("a request takes one class_id for its heatmaps")
    return wanted


def output_tensor(metadata: ModelMetadata, rows: Sequence[Row], wanted: Wanted) -> OutputTensor:
    """The output ``wanted`` names, from each image's row of the model's outputs."""
    if not wanted.classification:
        values = np.stack([row[wanted.source] for row in rows]).astype(np.float32, copy=False)
        return OutputTensor(wanted.name, "FP32", values, wanted.binary)
    # Triton's classification format, "score:index:label", the score as C's "%f".
    classify = Classify(metadata, wanted.classification, wanted.classification)
    ranked = [
        [f"{p.score:f}:{p.class_id}:{p.label}".encode() for p in classify(row)] for row in rows
    ]
    return OutputTensor(wanted.name, "BYTES", np.array(ranked, dtype=object), wanted.binary)


def _check_count(spec: RequestInput, limits: UploadLimits) -> None:
    count, limit = spec.shape[0], limits.max_images_per_request
    if not 1 <= count <= limit:
        raise BadRequest(
            f"input {spec.name!r}: {count} images, the limit is 1..{limit} "
            f"(max_images_per_request={limit})"
        )


def _check_content_type(spec: RequestInput) -> None:
    content_type = spec.parameters.get("content_type")
    if content_type is not None and content_type != URL:
        raise BadRequest(
            f"input {spec.name!r}: content_type={content_type!r} is not {URL!r} (image URLs); "
            "leave it out for encoded images"
        )
    if content_type == URL and spec.datatype != "BYTES":
        raise BadRequest(
            f"input {spec.name!r}: content_type {URL!r} takes BYTES [N], got {spec.datatype}"
        )


def _url(what: str, index: int, element: Any) -> str:
    if isinstance(element, bytes):
        try:
            element = element.decode()
        except UnicodeDecodeError:
            raise BadRequest(f"{what}: element {index} is not UTF-8 text (a URL)") from None
    if not isinstance(element, str) or not element:
        raise BadRequest(f"{what}: element {index} is not a URL (a non-empty string)")
    return element


def _base64(spec: RequestInput) -> list[bytes]:
    if spec.data is None:
        raise BadRequest(f"input {spec.name!r} has neither data nor binary_data_size")
    elements = []
    for index, item in enumerate(spec.data):
        try:
            if not isinstance(item, str):
                raise TypeError(type(item).__name__)
            elements.append(base64.b64decode(item, validate=True))
        except (TypeError, binascii.Error) as exc:
            raise BadRequest(
                f"input {spec.name!r}: element {index} is not a base64 string ({exc}); "
                "send images as binary data, or base64 text in JSON"
            ) from None
    return elements


def _json_uint8(spec: RequestInput) -> np.ndarray:
    if spec.data is None:
        raise BadRequest(f"input {spec.name!r} has neither data nor binary_data_size")
    try:
        values = np.asarray(spec.data)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"input {spec.name!r}: data is not a regular array ({exc})") from None
    if values.dtype.kind not in "iu" or (
        values.size and not 0 <= values.min() <= values.max() <= 255
    ):
        raise BadRequest(f"input {spec.name!r}: UINT8 data must be integers 0..255")
    return values.astype(np.uint8).ravel()
