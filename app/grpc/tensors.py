"""gRPC's inference messages <-> the protocol's request and answer, so that gRPC goes through the
same checks and limits as REST (app.oip.tensors): an input's data comes from
``raw_input_contents`` or from its typed ``contents`` (``bytes_contents`` for BYTES,
``uint_contents`` for UINT8); outputs go back as ``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ValidationError

from app.grpc import inference_pb2 as pb
from app.oip.codec import OutputTensor, join_bytes, tensor_bytes
from app.oip.protocol import InferenceRequest, RequestInput, RequestOutput
from core.errors import BadRequest


def parameters(entries: Any) -> dict[str, Any]:
    """A protobuf parameter map (InferParameter or ModelRepositoryParameter) as plain values."""
    values = {}
    for key, parameter in entries.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice is not None else None
    return values


def to_request(message: pb.ModelInferRequest) -> tuple[InferenceRequest, list[bytes | None]]:
    """The request as REST would have parsed it, and each input's data."""
    try:
        request = InferenceRequest(
            id=message.id or None,
            parameters=parameters(message.parameters),
            inputs=[
                RequestInput(
                    name=tensor.name,
                    shape=list(tensor.shape),
                    datatype=tensor.datatype,
                    parameters=parameters(tensor.parameters),
                )
                for tensor in message.inputs
            ],
            outputs=[
                RequestOutput(name=output.name, parameters=parameters(output.parameters))
                for output in message.outputs
            ]
            or None,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise BadRequest(f"invalid inference request: {where}: {error['msg']}") from None
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    parts: list[bytes | None] = []
    for index, tensor in enumerate(message.inputs):
        if raw and tensor.HasField("contents"):
            raise BadRequest(f"input {tensor.name!r} has both contents and raw_input_contents")
        parts.append(raw[index] if raw else _typed(tensor))
    return request, parts


def _typed(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes | None:
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return join_bytes(contents.bytes_contents)
    if tensor.datatype == "UINT8":
        values = np.asarray(contents.uint_contents, dtype=np.uint32)
        if values.size and values.max() > 255:
            raise BadRequest(f"input {tensor.name!r}: UINT8 contents must be 0..255")
        return values.astype(np.uint8).tobytes()
    return None  # app.oip.tensors.the_input names the datatypes it takes


def to_response(
    name: str, version: str, request: InferenceRequest, outputs: list[OutputTensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id or "")
    for output in outputs:
        response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.values.shape)
        )
        response.raw_output_contents.append(tensor_bytes(output))
    return response
