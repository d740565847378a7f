"""Small real ONNX models that honour the export contract, and the images they classify."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from core.contract import INPUT_NAME, OUTPUT_NAME
from core.preprocess import Recipe, decode
from core.reference import entry_for, probe_images

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CROP_SIZE = 16


def build_model(
    path: Path,
    *,
    crop_size: int = CROP_SIZE,
    conv_layers: int = 0,
    width: int = 16,
    labels: list[str] = LABELS,
    metadata: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """uint8 NHWC -> /255 -> NCHW -> 4x4 average pool -> Gemm -> softmax.

    Weights are seeded, so predictions are deterministic, and the pooled 4x4 colour grid feeds
    the classifier, so different images get different classes. ``conv_layers`` adds a branch
    of 3x3 convolutions, pooled and concatenated to the features, for tests that need the
    model to cost real time (one shared weight tensor keeps the file small).
    """
    rng = np.random.default_rng(0)
    cell = crop_size // 4
    initializers = [numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale")]
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["x0"], perm=[0, 3, 1, 2]),
        *_pool("x0", "features", cell),
    ]
    fc_w = rng.normal(size=(3 * 16, len(labels))) * 1.5
    # Centres the colour features (mean 0.5), so no class wins just by having larger weights.
    fc_b = -0.5 * fc_w.sum(axis=0)
    if conv_layers:
        initializers += [
            numpy_helper.from_array(_conv_weight(rng, width, 3), "conv_in"),
            numpy_helper.from_array(_conv_weight(rng, width, width), "conv"),
        ]
        for layer in range(conv_layers):
            weight = "conv_in" if layer == 0 else "conv"
            nodes += [
                helper.make_node("Conv", [f"x{layer}", weight], [f"c{layer}"], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", [f"c{layer}"], [f"x{layer + 1}"]),
            ]
        nodes += _pool(f"x{conv_layers}", "conv_features", cell)
        nodes.append(helper.make_node("Concat", ["features", "conv_features"], ["all"], axis=1))
        # Small weights on the conv branch: it adds cost, the colour grid keeps classes diverse.
        fc_w = np.concatenate([fc_w, rng.normal(size=(width * 16, len(labels))) * 0.1])
    initializers += [
        numpy_helper.from_array(fc_w.astype(np.float32), "fc_w"),
        numpy_helper.from_array(fc_b.astype(np.float32), "fc_b"),
    ]
    nodes += [
        helper.make_node(
            "Gemm", ["all" if conv_layers else "features", "fc_w", "fc_b"], ["logits"]
        ),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.UINT8, ["N", crop_size, crop_size, 3]
            )
        ],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(labels)]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(labels)]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    # Its outputs for the probes, as export writes them (the server checks them at load).
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (answers,) = session.run([OUTPUT_NAME], {INPUT_NAME: probe_images(crop_size)})
    props = _metadata(crop_size, labels) | {"reference": json.dumps(entry_for(answers))}
    props |= metadata or {}
    helper.set_model_props(model, {k: v for k, v in props.items() if k not in drop})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _pool(source: str, target: str, cell: int) -> list[onnx.NodeProto]:
    return [
        helper.make_node(
            "AveragePool",
            [source],
            [f"{target}_grid"],
            kernel_shape=[cell, cell],
            strides=[cell, cell],
        ),
        helper.make_node("Flatten", [f"{target}_grid"], [target], axis=1),
    ]


def _conv_weight(rng: np.random.Generator, out: int, inp: int) -> np.ndarray:
    weight: np.ndarray = rng.normal(size=(out, inp, 3, 3)) / np.sqrt(inp * 9)
    return weight.astype(np.float32)


def _metadata(crop_size: int, labels: list[str]) -> dict[str, str]:
    return {
        "model_name": "tiny-test",
        "model_version": "7",
        "architecture": "tinynet",
        "precision": "fp32",
        "num_classes": str(len(labels)),
        "labels": json.dumps(labels),
        "preprocessing": json.dumps(
            {
                "resize_size": crop_size + crop_size // 4,
                "crop_size": crop_size,
                "interpolation": "bilinear",
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
            }
        ),
        "source_sha256": "ab" * 32,
        "accuracy": json.dumps({"top1": 0.5, "dataset": "synthetic", "images": 10}),
    }


def image_bytes(
    seed: int, fmt: str = "PNG", size: tuple[int, int] = (40, 30), mode: str = "RGB"
) -> bytes:
    """Random 4x4 colour blocks: different seeds give different predictions from the tiny model."""
    rng = np.random.default_rng(seed)
    blocks = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    blocks.resize(size, Image.Resampling.NEAREST).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


# ~20 ms per image on one core: batches form under load, and warm-up takes most of a second.
SLOW_CROP = 64


def build_slow_model(path: Path) -> Path:
    return build_model(path, crop_size=SLOW_CROP, conv_layers=6, width=64)


def recipe_for(crop_size: int) -> Recipe:
    """The recipe ``build_model`` writes into the metadata for ``crop_size``."""
    return Recipe(resize_size=crop_size + crop_size // 4, crop_size=crop_size)


def offline_top(
    model_path: Path, data: bytes, k: int, crop_size: int = CROP_SIZE
) -> list[tuple[int, float]]:
    """What the served model must answer for ``data``: class ids and scores, best first."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    crop = decode(data, recipe_for(crop_size))[None]
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: crop})
    row = np.asarray(probabilities)[0]
    order = np.argsort(-row, kind="stable")[:k]
    return [(int(i), float(row[i])) for i in order]
