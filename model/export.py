"""Export a checkpoint to the ONNX file the server loads; refuse to write it unless it checks out.

    python -m model export artifacts/checkpoint.pt --out artifacts/model.onnx
    python -m model export resnet50-0676ba61.pth --out imagenet.onnx --eval-data val/
    python -m model export artifacts/checkpoint.pt --precision int8 --out artifacts/model.int8.onnx

The graph takes uint8[N, S, S, 3] RGB crops made by ``core.preprocess`` and returns
``probabilities``, ``logits``, the ``embedding`` and the ``class_map`` (core.contract); its
metadata carries labels, preprocessing, measured accuracy and reference outputs.
"""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from core.accuracy import describe, wilson
from core.contract import (
    CLASS_IDS_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    PRECISIONS,
    SERVED_OUTPUTS,
    ModelMetadata,
    Preprocessing,
)
from core.errors import ModelError
from core.reference import EXTRAS, entry_for, eval_entry, extras_entry, probe_images
from model.checkpoint import Checkpoint
from model.evalsets import EvalSet
from model.files import atomic_path
from model.wrap import ServingModel

log = logging.getLogger(__name__)
# A model's name: what a model repository's folder for it is called, and what clients send.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # as app.repository.sources

# Raised whenever the file gains something servers rely on: `model build` then re-exports
# files an older export wrote (2: the evaluation-set reference outputs; 3: the embedding and
# class activation maps).
EXPORT_FORMAT = 3
FP32_MAX_ABS_DIFF = 1e-4
# The embedding and maps are compared on this many evaluation images (the maps of a 1000-class
# 224x224 model are 196 KB an image).
EXTRAS_IMAGES = 64
FP16_MIN_AGREEMENT = 0.99
INT8_MAX_ACCURACY_DROP = 0.01


def export(
    ckpt: Checkpoint,
    out: Path,
    *,
    precision: str = "fp32",
    eval_set: EvalSet,
    calibration: np.ndarray | None = None,
    version: str | None = None,
    name: str | None = None,
) -> ModelMetadata:
    """Write ``out`` only after ONNX Runtime agrees with PyTorch; return the metadata written.
    ``name``: the model's name in it (default: the checkpoint's), which a model repository's
    folder must match."""
    if name is not None and not MODEL_NAME.fullmatch(name):
        raise ModelError(
            f"name {name!r}: 1-128 letters, digits, '.', '_' or '-', the first a letter or a digit"
        )
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8" and calibration is None:
        raise ModelError("int8 needs calibration images (--calib-data)")
    serving = ServingModel(ckpt.build_model(), ckpt.mean, ckpt.std).eval()
    with tempfile.TemporaryDirectory(prefix="resnet-serve-export-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        _torch_export(serving, ckpt.recipe.crop_size, fp32_path)
        reference = _torch_outputs(serving, eval_set.images)
        some = eval_set.images[:EXTRAS_IMAGES]
        torch_extras = _torch_outputs(serving, some, EXTRAS)
        fp32_probs = run_onnx(fp32_path.read_bytes(), eval_set.images)
        report = {"fp32": _compare(fp32_probs, reference)}
        report["fp32"] |= _compare_extras(run_outputs(fp32_path.read_bytes(), some), torch_extras)
        _check_fp32(report["fp32"])
        if precision == "fp32":
            model_bytes = fp32_path.read_bytes()
            probs = fp32_probs
        else:
            if precision == "fp16":
                model_bytes = _to_fp16(fp32_path)
            else:
                assert calibration is not None
                model_bytes = _to_int8(fp32_path, calibration, Path(tmp))
            probs = run_onnx(model_bytes, eval_set.images)
            report[precision] = _compare(probs, reference)
            report[precision] |= _compare_extras(run_outputs(model_bytes, some), torch_extras)
            if precision == "fp16":
                _check_fp16(report["fp16"])
        accuracy = _accuracy(probs, eval_set)
        if accuracy is not None:
            interval = (accuracy["top1_ci95"][0], accuracy["top1_ci95"][1])
            said = describe(accuracy["top1"], accuracy["images"], interval)
            log.info("%s on %s: %s", precision, accuracy["dataset"], said)
        if precision == "int8" and accuracy is not None:
            _check_int8(accuracy["top1"], _accuracy(fp32_probs, eval_set)["top1"])  # type: ignore[index]
        probes = run_outputs(model_bytes, probe_images(ckpt.recipe.crop_size), SERVED_OUTPUTS)
        answers = probes[OUTPUT_NAME]
        parity: dict[str, Any] = dict(report[precision])
        if precision == "fp32":
            parity["bf16"] = _bf16_report(model_bytes, eval_set, fp32_probs)
    # The reference the server checks against: fp32 answers on evaluation images, and what this
    # file measured against them where it is not fp32 (its bound is loosened to that).
    own = None if precision == "fp32" else (precision, probs)
    check = eval_entry(eval_set.images, fp32_probs, eval_set.name, own)
    metadata = _metadata(ckpt, precision, accuracy, parity, version, name)
    extras = extras_entry(probes)
    metadata = replace(metadata, reference=entry_for(answers) | {"eval": check, "extras": extras})
    model = onnx.load_from_string(model_bytes)
    optional_class_ids(model)
    onnx.helper.set_model_props(model, metadata.to_props())
    model.producer_name = "resnet-serve"
    with atomic_path(out) as tmp_out:
        onnx.save(model, str(tmp_out))
    log.info("wrote %s (%s, %.1f MB): %s", out, precision, out.stat().st_size / 1e6, parity)
    return metadata


def optional_class_ids(model: onnx.ModelProto) -> None:
    """Make the class ids input optional, -1 (each image's top class) unless fed: an initializer
    of the input's name is its default (ONNX IR 4), so a runtime or a script that feeds the images
    alone (Triton, a 40-line script, an older server) runs the file as before."""
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), CLASS_IDS_NAME)
    )
    (declared,) = [each for each in model.graph.input if each.name == CLASS_IDS_NAME]
    # Its own length: 1 by default (broadcast over the batch), or the batch's when fed.
    declared.type.tensor_type.shape.dim[0].dim_param = "class_ids_count"


class _SkipTorchvisionOpsNotice(logging.Filter):
    """Drops "torchvision is not installed. Skipping torchvision::nms" and its siblings.

    torch's ONNX op registry says this once per torchvision op (nms, roi_align, ...) whenever
    the torchvision package is absent. A ResNet export uses none of those ops, and torchvision
    checkpoints load without the package, so the notice only alarms. Other messages pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed. Skipping ")


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
    _SkipTorchvisionOpsNotice()
)


def _torch_export(serving: ServingModel, crop: int, path: Path) -> None:
    example = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    class_ids = torch.full((2,), -1, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # torch.export's own deprecation chatter is not the user's concern.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # Both inputs share the batch axis, as they should: torch says so at length.
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        torch.onnx.export(
            serving,
            (example, class_ids),
            str(path),
            input_names=[INPUT_NAME, CLASS_IDS_NAME],
            output_names=list(SERVED_OUTPUTS),
            dynamic_shapes={INPUT_NAME: {0: batch}, CLASS_IDS_NAME: {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


@torch.no_grad()
def _torch_outputs(
    serving: ServingModel, images: np.ndarray, names: tuple[str, ...] = (OUTPUT_NAME,)
) -> Any:
    """PyTorch's outputs for ``images``: the probabilities alone by default, else each of
    ``names`` by name."""
    positions = [SERVED_OUTPUTS.index(name) for name in names]
    chunks: list[list[torch.Tensor]] = [[] for _ in names]
    for i in range(0, len(images), 64):
        chunk_images = torch.from_numpy(images[i : i + 64])
        outputs = serving(chunk_images, torch.full((len(chunk_images),), -1))
        for chunk, position in zip(chunks, positions, strict=True):
            chunk.append(outputs[position])
    joined = {name: torch.cat(chunk).numpy() for name, chunk in zip(names, chunks, strict=True)}
    return joined if names != (OUTPUT_NAME,) else joined[OUTPUT_NAME]


def top_class(images: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs for ``images``, each image's map for its top class."""
    return {INPUT_NAME: images, CLASS_IDS_NAME: np.full(len(images), -1, dtype=np.int64)}


def run_onnx(model: bytes | str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    return run_outputs(model, images, (OUTPUT_NAME,), batch)[OUTPUT_NAME]


def run_outputs(
    model: bytes | str,
    images: np.ndarray,
    names: tuple[str, ...] = EXTRAS,
    batch: int = 64,
) -> dict[str, np.ndarray]:
    """ONNX Runtime's CPU outputs ``names`` for ``images``, float32, by name."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    chunks = [
        session.run(list(names), top_class(images[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    return {
        name: np.concatenate([chunk[k] for chunk in chunks]).astype(np.float32)
        for k, name in enumerate(names)
    }


def _bf16_report(model: bytes, eval_set: EvalSet, fp32_probs: np.ndarray) -> dict[str, Any]:
    """The fp32 file computed in bf16 by OpenVINO, as a server with backend=auto would where the
    CPU has bf16: agreement with fp32, and accuracy. Skipped, with why, where it cannot be."""
    try:
        import openvino  # type: ignore[import-untyped]
    except ImportError as exc:
        return {"skipped": f"openvino is not installed ({exc})"}
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return {"skipped": "this CPU has no bf16 (OpenVINO reports no BF16 capability)"}
    probs = run_openvino(model, eval_set.images, "bf16")
    report: dict[str, Any] = _compare(probs, fp32_probs)
    accuracy = _accuracy(probs, eval_set)
    if accuracy is not None:
        report["top1"] = accuracy["top1"]
    return report


def run_openvino(model: bytes, images: np.ndarray, hint: str, batch: int = 64) -> np.ndarray:
    """``run_onnx`` on OpenVINO's CPU plugin, computing in ``hint`` (f32, bf16)."""
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": hint}
    compiled = core.compile_model(core.read_model(model, b""), "CPU", config)
    request, output = compiled.create_infer_request(), compiled.output(OUTPUT_NAME)
    chunks = [
        # The images alone: OpenVINO reads the class ids' default as a constant (and no map is
        # fetched here).
        np.array(request.infer({INPUT_NAME: images[i : i + batch]})[output], copy=True)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(chunks).astype(np.float32)


def _compare(probs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_diff": float(np.abs(probs - reference).max()),
        "top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
        "images": len(probs),
    }


def _compare_extras(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, float]:
    """Each extra output against PyTorch's: the largest difference relative to the reference's
    largest value (the embedding's scale is the model's), and the worst row's cosine."""
    report = {}
    for name in EXTRAS:
        got = outputs[name].reshape(len(outputs[name]), -1).astype(np.float64)
        want = reference[name].reshape(len(reference[name]), -1).astype(np.float64)
        scale = max(float(np.abs(want).max()), 1e-12)
        dots = (got * want).sum(axis=1)
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cosines = np.where(norms > 0, dots / np.maximum(norms, 1e-30), 1.0)
        report[f"{name}_max_rel_diff"] = float(np.abs(got - want).max() / scale)
        report[f"{name}_min_cosine"] = round(float(cosines.min()), 6)
    return report


def _check_fp32(parity: dict[str, float]) -> None:
    if parity["max_abs_diff"] > FP32_MAX_ABS_DIFF or parity["top1_agreement"] < 1.0:
        raise ModelError(
            f"export check failed, nothing written: ONNX Runtime vs PyTorch max abs diff "
            f"{parity['max_abs_diff']:.2e} (limit {FP32_MAX_ABS_DIFF:.0e}), top-1 agreement "
            f"{parity['top1_agreement']:.2%} (need 100%)"
        )
    for name in EXTRAS:
        worst = parity[f"{name}_max_rel_diff"]
        if worst > FP32_MAX_ABS_DIFF:
            raise ModelError(
                f"export check failed, nothing written: ONNX Runtime vs PyTorch {name} differs "
                f"by up to {worst:.2e} of its largest value (limit {FP32_MAX_ABS_DIFF:.0e})"
            )


def _check_fp16(parity: dict[str, float]) -> None:
    if parity["top1_agreement"] < FP16_MIN_AGREEMENT:
        raise ModelError(
            f"fp16 check failed, nothing written: top-1 agreement with fp32 "
            f"{parity['top1_agreement']:.2%} (need {FP16_MIN_AGREEMENT:.0%})"
        )


def _check_int8(int8_top1: float, fp32_top1: float) -> None:
    if fp32_top1 - int8_top1 > INT8_MAX_ACCURACY_DROP:
        raise ModelError(
            f"int8 check failed, nothing written: top-1 {int8_top1:.2%} vs fp32 {fp32_top1:.2%} "
            f"(allowed drop {INT8_MAX_ACCURACY_DROP:.0%}); try more or other --calib-data"
        )


def _accuracy(probs: np.ndarray, eval_set: EvalSet) -> dict[str, Any] | None:
    if eval_set.targets is None:
        return None
    right = probs.argmax(1) == eval_set.targets
    images = len(eval_set.targets)
    low, high = wilson(int(right.sum()), images)
    top1 = float(right.mean())
    return {
        "top1": round(top1, 5),
        "top1_ci95": [round(low, 5), round(high, 5)],
        "dataset": eval_set.name,
        "images": images,
    }


def _to_fp16(fp32_path: Path) -> bytes:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: clients still send uint8 and read float32; only the inside runs in fp16.
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    serialized: bytes = model.SerializeToString()
    return serialized


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else top_class(batch)


def _to_int8(fp32_path: Path, calibration: np.ndarray, tmp: Path) -> bytes:
    """Static QDQ quantisation, per-channel weights, calibrated on training images."""
    prepared, quantized = tmp / "prepared.onnx", tmp / "int8.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(quantized),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        # The normalisation (Cast, Transpose, Sub, Div) and softmax stay fp32: quantising the
        # graph's first ops cost ~0.6 ms per image and bought nothing.
        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "MaxPool", "GlobalAveragePool"],
    )
    return quantized.read_bytes()


def _metadata(
    ckpt: Checkpoint,
    precision: str,
    accuracy: dict[str, Any] | None,
    parity: dict[str, Any],
    version: str | None,
    name: str | None = None,
) -> ModelMetadata:
    training: dict[str, Any] = {
        k: ckpt.metrics[k] for k in ("val_top1", "epoch") if k in ckpt.metrics
    }
    return ModelMetadata(
        name=name or ckpt.name,
        version=version or ckpt.sha256[:12],
        architecture=ckpt.arch,
        precision=precision,
        labels=tuple(ckpt.labels),
        preprocessing=Preprocessing(ckpt.recipe, ckpt.mean, ckpt.std),
        source_sha256=ckpt.sha256,
        accuracy=accuracy,
        parity=parity,
        training=training or None,
    )


def read_metadata(path: Path) -> ModelMetadata:
    model = onnx.load(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
