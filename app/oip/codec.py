"""The protocol's wire format: a JSON header, then binary tensor data (Triton's extension).

Request: ``Inference-Header-Content-Length`` bytes of JSON, then each input with
``parameters.binary_data_size`` in order; a BYTES element is a 4-byte little-endian length and
its bytes, the prefixes counted in ``binary_data_size``. Responses use the same layout for the
outputs asked for in binary.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from app.oip.protocol import InferenceRequest, RequestInput
from core.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    values: np.ndarray  # float32, or an object array of bytes
    binary: bool


def parse_request(
    body: bytes, header_length: str | None
) -> tuple[InferenceRequest, list[bytes | None]]:
    """The request header, and each input's binary data (None where it came as JSON data)."""
    header, tail = _split(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        raise BadRequest(f"invalid inference request: {_describe(exc)}") from None
    return request, _binary_parts(request.inputs, tail)


def split_bytes(raw: bytes, what: str) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then data."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _PREFIX.size > len(raw):
            raise BadRequest(f"{what}: {len(raw) - offset} trailing bytes are too few for a length")
        (size,) = _PREFIX.unpack_from(raw, offset)
        offset += _PREFIX.size
        if offset + size > len(raw):
            raise BadRequest(
                f"{what}: element {len(elements)} declares {size} bytes, "
                f"only {len(raw) - offset} follow"
            )
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def encode_response(
    header: dict[str, Any], outputs: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    entries, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.values.shape),
        }
        if output.binary:
            blob = tensor_bytes(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(output)
        entries.append(entry)
    head = json.dumps({**header, "outputs": entries}).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(
            f"{HEADER_LENGTH}: {header_length!r} is not a length within the {len(body)}-byte body"
        )
    size = int(header_length)
    return body[:size], body[size:]


def _binary_parts(inputs: Sequence[RequestInput], tail: bytes) -> list[bytes | None]:
    parts: list[bytes | None] = []
    offset = 0
    for spec in inputs:
        size = spec.parameters.get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if type(size) is not int or size < 0 or offset + size > len(tail):
            raise BadRequest(
                f"input {spec.name!r}: binary_data_size={size!r} does not fit the "
                f"{len(tail) - offset} binary bytes left after the JSON header"
            )
        parts.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise BadRequest(
            f"{len(tail) - offset} bytes after the JSON header belong to no input "
            "(binary_data_size)"
        )
    return parts


def join_bytes(elements: Iterable[bytes]) -> bytes:
    """A binary BYTES tensor: each element as a 4-byte little-endian length, then its data."""
    return b"".join(_PREFIX.pack(len(item)) + item for item in elements)


def tensor_bytes(output: OutputTensor) -> bytes:
    """The tensor's binary data, as the binary extension and gRPC's raw contents carry it."""
    if output.datatype == "BYTES":
        return join_bytes(output.values.ravel())
    return output.values.astype("<f4").tobytes()


def _to_json(output: OutputTensor) -> list[Any]:
    if output.datatype == "BYTES":
        return [item.decode() for item in output.values.ravel()]
    values: list[Any] = output.values.ravel().tolist()
    return values


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors()
    )
