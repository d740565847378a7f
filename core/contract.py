"""The ONNX file as a contract: tensor names, precisions and the metadata export writes.

``model.export`` writes ``ModelMetadata.to_props()`` into the file's ``metadata_props``; the
server reads it back with ``ModelMetadata.from_props()``. Adding a field means editing this
module only: both sides, and ``python -m model info``, follow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError
from core.preprocess import Recipe

# uint8[N, S, S, 3] RGB crops in, and int64[N] class ids (below); float32[N, C] softmax out, and
# beside it:
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
LOGITS_NAME = "logits"  # float32[N, C], before the softmax
EMBEDDING_NAME = "embedding"  # float32[N, F]: the pooled features the classifier reads
# float32[N, h, w]: each image's class activation map (Zhou et al., CVPR 2016) for the class its
# row of CLASS_IDS_NAME names (-1: its top class): the classifier's weights for that class over
# the last convolutional maps before pooling, sum_k w[c, k] * A_k(x, y). Its mean over (x, y),
# plus the class's bias, is the class's logit. One class per image keeps it a thousandth of the
# network's work, cheap enough to compute in every batch (ONNX Runtime computes every node of a
# graph whichever outputs a run fetches).
CLASS_MAP_NAME = "class_map"
CLASS_IDS_NAME = "class_ids"
# The named outputs a runtime computes for the server, each [N, ...] with a row per image: what the
# heads (app.pipeline.heads) answer from. The first is the classification every file has; a file
# exported before the others (export format 2, without the class ids input) serves without them,
# and a request for one is refused naming what the file lacks.
SERVED_OUTPUTS = (OUTPUT_NAME, LOGITS_NAME, EMBEDDING_NAME, CLASS_MAP_NAME)
# What a classification reads: the outputs a batch copies out unless a request asks for more.
CLASSIFY = frozenset({OUTPUT_NAME})
PRECISIONS = ("fp32", "fp16", "int8")
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


def variant_path(path: Path, precision: str) -> Path:
    """Where ``model build --also PRECISION`` writes a variant, and where the server looks for it:
    beside ``path``, ``model.onnx`` -> ``model.fp16.onnx``."""
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {PRECISIONS}")
    return path.with_name(f"{path.stem}.{precision}{path.suffix}")


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation recipe, plus the normalisation the graph applies inside (for the record)."""

    recipe: Recipe
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            recipe=Recipe.from_dict(dict(data)),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: str
    architecture: str
    precision: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    source_sha256: str
    accuracy: dict[str, Any] | None  # measured at export; None without a labelled eval set
    parity: dict[str, Any] | None = None  # ONNX Runtime vs PyTorch on the eval images
    training: dict[str, Any] | None = None
    # Its own outputs for core.reference's probes, checked by the server before it serves.
    reference: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ModelError(f"model metadata precision={self.precision!r} not in {PRECISIONS}")
        if not self.labels:
            raise ModelError("model metadata 'labels' must be a non-empty list")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def recipe(self) -> Recipe:
        return self.preprocessing.recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, keyed as in the file (``python -m model info`` prints this)."""
        return {
            "model_name": self.name,
            "model_version": self.version,
            "architecture": self.architecture,
            "precision": self.precision,
            "num_classes": self.num_classes,
            "labels": list(self.labels),
            "preprocessing": self.preprocessing.to_dict(),
            "source_sha256": self.source_sha256,
            "accuracy": self.accuracy,
            "parity": self.parity,
            "training": self.training,
            "reference": self.reference,
        }

    def to_props(self) -> dict[str, str]:
        """ONNX ``metadata_props``: strings as they are, everything else as JSON."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMetadata:
        """Parse and check; every problem is a one-line ``ModelError`` naming the key."""
        missing = [key for key in REQUIRED_KEYS if key not in props]
        if missing:
            raise ModelError(f"model metadata is missing {missing}")
        labels = _json(props, "labels", list)
        if not all(isinstance(label, str) for label in labels):
            raise ModelError("model metadata 'labels' must be a non-empty JSON list of strings")
        if props["num_classes"] != str(len(labels)):
            raise ModelError(
                f"model metadata num_classes={props['num_classes']!r} "
                f"but 'labels' has {len(labels)}"
            )
        try:
            preprocessing = Preprocessing.from_dict(_json(props, "preprocessing", dict))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model metadata 'preprocessing' is invalid: {exc!r}") from exc
        return cls(
            name=props["model_name"],
            version=props["model_version"],
            architecture=props["architecture"],
            precision=props["precision"],
            labels=tuple(labels),
            preprocessing=preprocessing,
            source_sha256=props["source_sha256"],
            accuracy=_json(props, "accuracy", (dict, type(None))),
            parity=_optional(props, "parity"),
            training=_optional(props, "training"),
            reference=_optional(props, "reference"),
        )


def _optional(props: Mapping[str, str], key: str) -> dict[str, Any] | None:
    return _json(props, key, (dict, type(None))) if key in props else None


def _json(props: Mapping[str, str], key: str, kind: type | tuple[type, ...]) -> Any:
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f"model metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise ModelError(f"model metadata {key!r} has the wrong JSON type: {props[key][:80]!r}")
    return value
