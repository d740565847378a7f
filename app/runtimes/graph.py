"""Each runtime's reading of an ONNX graph, held to the contract (core.contract) before it serves:
the input uint8[N, S, S, 3] at the metadata's crop size, and the probabilities [N, C] for the
metadata's classes (the other served outputs are optional: a file exported before them serves
without them). Symbolic (dynamic) dimensions are accepted;
static ones must agree with the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnxruntime as ort

from core.contract import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from core.errors import ModelError

_SERVED = repr(OUTPUT_NAME)


def check_onnx(session: ort.InferenceSession, info: ModelMetadata) -> None:
    """ONNX Runtime's reading of the graph (its session's inputs and outputs)."""
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(
            f"model must have input {INPUT_NAME!r} and output {_SERVED}, "
            f"has inputs {list(inputs)} and outputs {list(outputs)}"
        )
    image_input, probabilities = inputs[INPUT_NAME], outputs[OUTPUT_NAME]
    if image_input.type != "tensor(uint8)" or len(image_input.shape) != 4:
        raise ModelError(
            f"input {INPUT_NAME!r} must be uint8[N, S, S, 3], is {image_input.type}"
            f"{image_input.shape}"
        )
    crop = info.recipe.crop_size
    for axis, expected in ((1, crop), (2, crop), (3, 3)):
        _check_dim(INPUT_NAME, image_input.shape, axis, expected)
    if len(probabilities.shape) != 2:
        raise ModelError(f"output {OUTPUT_NAME!r} must be [N, C], is {probabilities.shape}")
    _check_dim(OUTPUT_NAME, probabilities.shape, 1, info.num_classes)


def _check_dim(name: str, shape: Sequence[int | str | None], axis: int, expected: int) -> None:
    # Symbolic (str/None) dimensions are accepted; static ones must agree with the metadata.
    dim = shape[axis]
    if isinstance(dim, int) and dim != expected:
        raise ModelError(
            f"{name} has shape {list(shape)}, but the metadata implies {expected} on axis {axis}"
        )


def check_openvino(model: Any, metadata: ModelMetadata) -> None:
    """OpenVINO's reading of the graph (its model's ports), checked as ``check_onnx`` does."""
    inputs = {name: port for port in model.inputs for name in port.get_names()}
    outputs = {name: port for port in model.outputs for name in port.get_names()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(
            f"model must have input {INPUT_NAME!r} and output {_SERVED}, "
            f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    crop, classes = metadata.recipe.crop_size, metadata.num_classes
    images, probabilities = inputs[INPUT_NAME], outputs[OUTPUT_NAME]
    shape = images.get_partial_shape()
    expected = [None, crop, crop, 3]
    if images.get_element_type().get_type_name() != "u8" or not _fits(shape, expected):
        raise ModelError(
            f"input {INPUT_NAME!r} must be uint8[N, {crop}, {crop}, 3], is "
            f"{images.get_element_type()}{shape}"
        )
    if not _fits(probabilities.get_partial_shape(), [None, classes]):
        raise ModelError(
            f"output {OUTPUT_NAME!r} must be [N, {classes}], is {probabilities.get_partial_shape()}"
        )


def _fits(shape: Any, expected: list[int | None]) -> bool:
    # Dynamic dimensions are accepted; static ones must agree with the metadata.
    if shape.rank.is_dynamic or len(shape) != len(expected):
        return False
    return all(
        want is None or dim.is_dynamic or dim.get_length() == want
        for dim, want in zip(shape, expected, strict=True)
    )
