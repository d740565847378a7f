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

from core.contract import CLASS_IDS_NAME, CLASS_MAP_NAME, EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME
from core.preprocess import Recipe, decode
from core.reference import EXTRAS, entry_for, extras_entry, probe_images

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
    stuck_iterations: int = 0,
    extras: bool = True,
) -> Path:
    """uint8 NHWC -> /255 -> NCHW -> 4x4 average pool -> Gemm -> softmax.

    ``extras``: the contract's other outputs too, as an export since format 3 writes them
    (core.contract): the pooled features as the embedding, and a class map of 4x4 over the colour
    grid for each image's class id (-1: its top class), with the class ids input. Without, the
    file is one exported before them.

    Weights are seeded, so predictions are deterministic, and the pooled 4x4 colour grid feeds
    the classifier, so different images get different classes. ``conv_layers`` adds a branch
    of 3x3 convolutions, pooled and concatenated to the features, for tests that need the
    model to cost real time (one shared weight tensor keeps the file small).

    ``stuck_iterations``: a model that misbehaves on purpose, through ONNX Runtime itself: an
    image whose top-left pixel is pure red (255, 0, 0) makes the run fail (an index out of
    range), and one whose top-left pixel is pure blue (0, 0, 255) makes it loop that many
    times (about 1.5 us each) before it answers (``POISON``, ``STALL``).
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
    gemm_out = "logits_plain" if stuck_iterations else "logits"
    nodes.append(
        helper.make_node("Gemm", ["all" if conv_layers else "features", "fc_w", "fc_b"], [gemm_out])
    )
    if stuck_iterations:
        faults, fault_weights = _faults(gemm_out, "logits", stuck_iterations)
        nodes += faults
        initializers += fault_weights
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", crop_size, crop_size, 3])
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(labels)]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(labels)]),
    ]
    if extras:
        more_nodes, more_weights = _extras(fc_w[:48], len(labels))
        nodes += more_nodes
        initializers += more_weights
        # Optional, as export makes it (model.export.optional_class_ids): -1 unless fed.
        inputs.append(helper.make_tensor_value_info(CLASS_IDS_NAME, TensorProto.INT64, ["M"]))
        initializers.append(numpy_helper.from_array(np.array([-1], np.int64), CLASS_IDS_NAME))
        outputs += [
            helper.make_tensor_value_info(EMBEDDING_NAME, TensorProto.FLOAT, ["N", 48]),
            helper.make_tensor_value_info(CLASS_MAP_NAME, TensorProto.FLOAT, ["N", 4, 4]),
        ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    # Its outputs for the probes, as export writes them (the server checks them at load).
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probes = probe_images(crop_size)
    feeds = {INPUT_NAME: probes}
    if extras:
        feeds[CLASS_IDS_NAME] = np.full(len(probes), -1, dtype=np.int64)
    names = [OUTPUT_NAME, *EXTRAS] if extras else [OUTPUT_NAME]
    answered = dict(zip(names, session.run(names, feeds), strict=True))
    reference = entry_for(answered[OUTPUT_NAME])
    if extras:
        reference["extras"] = extras_entry(answered)
    props = _metadata(crop_size, labels) | {"reference": json.dumps(reference)}
    props |= metadata or {}
    helper.set_model_props(model, {k: v for k, v in props.items() if k not in drop})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# The top-left pixels that make a ``stuck_iterations`` model fail, or stall.
POISON = (255, 0, 0)
STALL = (0, 0, 255)


def _faults(
    source: str, target: str, iterations: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``target = source + 0``, computed through a Gather that fails on a red top-left pixel and
    a Loop that runs ``iterations`` times on a blue one."""
    weights = [
        numpy_helper.from_array(np.zeros(510, np.float32), "fault_table"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array(2, np.int64), "i2"),
        numpy_helper.from_array(np.array(255, np.int64), "i255"),
        numpy_helper.from_array(np.array(iterations, np.int64), "iterations"),
        numpy_helper.from_array(np.array(0.0, np.float32), "f0"),
    ]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Identity", ["carried"], ["carried_out"]),
        ],
        "stall",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, []),
        ],
    )
    nodes = [
        helper.make_node("Gather", ["images", "i0"], ["top_row"], axis=1),
        helper.make_node("Gather", ["top_row", "i0"], ["corner_u8"], axis=1),
        helper.make_node("Cast", ["corner_u8"], ["corner"], to=TensorProto.INT64),
        helper.make_node("Gather", ["corner", "i0"], ["red"], axis=1),
        helper.make_node("Gather", ["corner", "i1"], ["green"], axis=1),
        helper.make_node("Gather", ["corner", "i2"], ["blue"], axis=1),
        # red - green + 255 is 510 only for pure red: one past the table's end.
        helper.make_node("Sub", ["red", "green"], ["red_less_green"]),
        helper.make_node("Add", ["red_less_green", "i255"], ["index"]),
        helper.make_node("Gather", ["fault_table", "index"], ["zeros"], axis=0),
        helper.make_node("Unsqueeze", ["zeros", "i1"], ["zero_column"]),
        # blue - red - green is 255 only for pure blue.
        helper.make_node("Sub", ["blue", "red"], ["blue_less_red"]),
        helper.make_node("Sub", ["blue_less_red", "green"], ["blueness"]),
        helper.make_node("Equal", ["blueness", "i255"], ["is_blue"]),
        helper.make_node("Cast", ["is_blue"], ["blue_count"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["blue_count"], ["any_blue"], keepdims=0),
        helper.make_node("Mul", ["any_blue", "iterations"], ["trips"]),
        helper.make_node("Loop", ["trips", "", "f0"], ["stalled"], body=body),
        helper.make_node("Add", [source, "zero_column"], [f"{source}_checked"]),
        helper.make_node("Add", [f"{source}_checked", "stalled"], [target]),
    ]
    return nodes, weights


def _extras(
    colour_weights: np.ndarray, classes: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The embedding (the colour grid's 48 features) and each image's class map: its class's
    weight per colour channel (the classifier's, averaged over the grid) over the 4x4 grid."""
    per_channel = colour_weights.reshape(3, 16, classes).mean(axis=1).T  # [classes, 3]
    weights = [
        numpy_helper.from_array(per_channel.astype(np.float32), "channel_w"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_id"),
        numpy_helper.from_array(np.array([0, 3, 16], np.int64), "grid_shape"),
        numpy_helper.from_array(np.array([-1, 4, 4], np.int64), "map_shape"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
    ]
    nodes = [
        helper.make_node("Identity", ["features"], [EMBEDDING_NAME]),
        helper.make_node("ArgMax", ["logits"], ["top_class"], axis=1, keepdims=0),
        helper.make_node("GreaterOrEqual", [CLASS_IDS_NAME, "zero_id"], ["given"]),
        helper.make_node("Where", ["given", CLASS_IDS_NAME, "top_class"], ["chosen"]),
        helper.make_node("Gather", ["channel_w", "chosen"], ["chosen_w"], axis=0),
        helper.make_node("Unsqueeze", ["chosen_w", "axis_1"], ["chosen_row"]),
        helper.make_node("Reshape", ["features_grid", "grid_shape"], ["grid"]),
        helper.make_node("MatMul", ["chosen_row", "grid"], ["map_flat"]),
        helper.make_node("Reshape", ["map_flat", "map_shape"], [CLASS_MAP_NAME]),
    ]
    return nodes, weights


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
