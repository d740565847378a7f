"""The ONNX Runtime session: provider choice, metadata contract checks, inference, warm-up."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.preprocess import Recipe
from app.settings import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
REQUIRED_KEYS = (
    "model_name",
    "model_version",
    "architecture",
    "precision",
    "num_classes",
    "labels",
    "preprocessing",
    "source_sha256",
    "accuracy",
)
PRECISIONS = ("fp32", "fp16", "int8")
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelError(Exception):
    """The model file cannot be served; the message is one line meant for the operator."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    architecture: str
    precision: str
    labels: tuple[str, ...]
    recipe: Recipe
    preprocessing: dict[str, Any]
    source_sha256: str
    accuracy: dict[str, Any] | None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelInfo:
        missing = [key for key in REQUIRED_KEYS if key not in meta]
        if missing:
            raise ModelError(f"model metadata is missing {missing}")
        labels = _json_field(meta, "labels", list)
        if not labels or not all(isinstance(label, str) for label in labels):
            raise ModelError("model metadata 'labels' must be a non-empty JSON list of strings")
        if meta["num_classes"] != str(len(labels)):
            raise ModelError(
                f"model metadata num_classes={meta['num_classes']!r} but 'labels' has {len(labels)}"
            )
        if meta["precision"] not in PRECISIONS:
            raise ModelError(f"model metadata precision={meta['precision']!r} not in {PRECISIONS}")
        accuracy = _json_field(meta, "accuracy", (dict, type(None)))
        preprocessing = _json_field(meta, "preprocessing", dict)
        try:
            recipe = Recipe.from_dict(preprocessing)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model metadata 'preprocessing' is invalid: {exc!r}") from exc
        return cls(
            name=meta["model_name"],
            version=meta["model_version"],
            architecture=meta["architecture"],
            precision=meta["precision"],
            labels=tuple(labels),
            recipe=recipe,
            preprocessing=preprocessing,
            source_sha256=meta["source_sha256"],
            accuracy=accuracy,
        )


def _json_field(meta: Mapping[str, str], key: str, kind: type | tuple[type, ...]) -> Any:
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f"model metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise ModelError(f"model metadata {key!r} has the wrong JSON type: {meta[key][:80]!r}")
    return value


def choose_providers(requested: str, available: Sequence[str]) -> tuple[list[str], str]:
    """Providers to ask ONNX Runtime for, and why, from the setting and what is installed."""
    if requested == "cpu":
        return [CPU], "providers=cpu"
    if CUDA in available:
        return [CUDA, CPU], f"providers={requested} and {CUDA} is available"
    if requested == "cuda":
        raise ModelError(f"providers=cuda but {CUDA} is not available (have {list(available)})")
    return [CPU], f"providers=auto and {CUDA} is not available (have {list(available)})"


class OnnxModel:
    def __init__(self, session: ort.InferenceSession, info: ModelInfo) -> None:
        self._session = session
        self.info = info
        self.provider: str = session.get_providers()[0]

    @classmethod
    def load(cls, settings: Settings) -> OnnxModel:
        path = settings.model_path
        if not path.is_file():
            raise ModelError(f"model file not found: {path} (set RESNET_SERVE_MODEL_PATH)")
        providers, reason = choose_providers(settings.providers, ort.get_available_providers())
        session = _open_session(path, providers, settings)
        if CUDA in providers and session.get_providers()[0] != CUDA:
            if settings.providers == "cuda":
                raise ModelError(f"{CUDA} failed to initialise; see the onnxruntime log above")
            reason = f"{CUDA} is installed but failed to initialise; see the onnxruntime log"
        info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map)
        _check_graph(session, info)
        model = cls(session, info)
        log.info("model loaded", extra={"provider": model.provider, "reason": reason})
        return model

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8[N, S, S, 3] -> probabilities float32[N, C]."""
        if self.provider == CUDA:
            return self._predict_bound(images)
        outputs = self._session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return np.asarray(outputs[0])

    def _predict_bound(self, images: np.ndarray) -> np.ndarray:
        # One host->device copy of the uint8 batch; only the probabilities come back, not logits.
        binding = self._session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(images))
        binding.bind_output(OUTPUT_NAME, "cpu")
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        # The first run of each shape pays for memory planning and kernel selection.
        size = self.info.recipe.crop_size
        for batch_size in batch_sizes:
            self.predict(np.zeros((batch_size, size, size, 3), dtype=np.uint8))


def _open_session(path: Path, providers: list[str], settings: Settings) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = OPTIMIZATION_LEVELS[settings.graph_optimization]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types, not importable uniformly
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load ONNX model {path}: {first_line}") from exc


def _check_graph(session: ort.InferenceSession, info: ModelInfo) -> None:
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(
            f"model must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
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
