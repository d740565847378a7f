import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.repository.configs import runtime_config
from app.runtimes import openvino
from app.runtimes.onnxruntime import OnnxModel
from app.runtimes.openvino import OpenVinoModel
from app.settings import Settings
from core import reference
from core.errors import ModelError
from core.preprocess import Recipe, decode
from model import checkpoint, evalsets, export
from model.resnet import build
from model.wrap import ServingModel


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> checkpoint.Checkpoint:
    return checkpoint.load(tiny_checkpoint)


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fp32_export(
    ckpt: checkpoint.Checkpoint, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    root, handler = logging.getLogger(), Messages()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        export.export(ckpt, out, eval_set=evalsets.eval_set_for(ckpt, None), version="7")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return out, handler.messages


@pytest.fixture(scope="module")
def fp32_onnx(fp32_export: tuple[Path, list[str]]) -> Path:
    return fp32_export[0]


@pytest.fixture(scope="module")
def export_log(fp32_export: tuple[Path, list[str]]) -> list[str]:
    return fp32_export[1]


def test_export_log_has_no_torchvision_notice(export_log: list[str]) -> None:
    # torch's registry logs one "torchvision is not installed. Skipping torchvision::..." per op.
    assert importlib.util.find_spec("torchvision") is None
    assert any(message.startswith("wrote ") for message in export_log)
    assert not [message for message in export_log if "torchvision" in message]


def test_fp32_matches_pytorch_on_real_images(
    ckpt: checkpoint.Checkpoint, fp32_onnx: Path, color_eval_folder: Path
) -> None:
    files = sorted(color_eval_folder.rglob("*.*"))
    images = np.stack([decode(f.read_bytes(), ckpt.recipe) for f in files])
    serving = ServingModel(ckpt.build_model(), ckpt.mean, ckpt.std).eval()
    with torch.no_grad():
        reference = serving(torch.from_numpy(images))[0].numpy()
    probs = export.run_onnx(str(fp32_onnx), images)
    assert np.abs(probs - reference).max() <= export.FP32_MAX_ABS_DIFF
    assert (probs.argmax(1) == reference.argmax(1)).all()


def test_metadata_round_trip(ckpt: checkpoint.Checkpoint, fp32_onnx: Path) -> None:
    meta = export.read_metadata(fp32_onnx).to_dict()
    assert meta["labels"] == ["blue", "green", "red"]
    assert meta["num_classes"] == 3
    assert meta["preprocessing"] == {
        "resize_size": 36,
        "crop_size": 32,
        "interpolation": "bilinear",
        "mean": list(checkpoint.IMAGENET_MEAN),
        "std": list(checkpoint.IMAGENET_STD),
    }
    assert meta["model_version"] == "7"
    assert meta["source_sha256"] == checkpoint.sha256_file(Path(ckpt.extra["config"]["out"]))
    assert meta["architecture"] == "resnet18"
    assert meta["precision"] == "fp32"
    assert meta["accuracy"]["dataset"] == "train-val"
    assert meta["parity"]["top1_agreement"] == 1.0


def test_server_loads_the_export(fp32_onnx: Path) -> None:
    model = OnnxModel.load(runtime_config(Settings(model_path=fp32_onnx, providers="cpu")))
    assert list(model.metadata.labels) == ["blue", "green", "red"]
    probs = model.predict(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_the_reference_is_evaluation_images_both_runtimes_meet(fp32_onnx: Path) -> None:
    meta = export.read_metadata(fp32_onnx)
    assert meta.reference is not None
    check = meta.reference["eval"]
    images = reference.eval_images(check)
    assert 1 <= len(images) <= reference.COUNT
    assert images.shape[1:] == (32, 32, 3)
    assert check["dataset"] == "train-val"
    assert check["bounds"] == reference.BOUNDS  # an fp32 file: nothing measured loosens them
    onnxruntime = OnnxModel.load(runtime_config(Settings(model_path=fp32_onnx, providers="cpu")))
    onnxruntime.check_reference()
    OpenVinoModel.load(fp32_onnx, "fp32", lanes=1, threads=1).check_reference()


def with_reference(source: Path, out: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """``source`` saved as ``out`` with ``change`` made to its metadata's ``reference.eval``."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    entry = json.loads(props["reference"])
    change(entry["eval"])
    props["reference"] = json.dumps(entry)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(out))
    return out


def test_a_reference_the_runtime_does_not_meet_is_refused(fp32_onnx: Path, tmp_path: Path) -> None:
    def next_class(check: dict[str, Any]) -> None:  # every image's top class: the next class
        for expected in check["top"]:
            expected[0][0] = (expected[0][0] + 1) % 3

    path = with_reference(fp32_onnx, tmp_path / "model.onnx", next_class)
    loaded = OnnxModel.load(runtime_config(Settings(model_path=path)))
    with pytest.raises(
        ModelError, match=r"on .* evaluation images .* top-1 agreement with fp32 0\.0%"
    ):
        loaded.check_reference()


def test_a_reference_that_does_not_fit_is_a_clear_error(fp32_onnx: Path, tmp_path: Path) -> None:
    path = with_reference(fp32_onnx, tmp_path / "model.onnx", lambda check: check["top"].pop())
    loaded = OnnxModel.load(runtime_config(Settings(model_path=path)))
    with pytest.raises(ModelError, match=r"its metadata 'reference' cannot be read: \d+ images"):
        loaded.check_reference()


def test_bf16_is_reported_where_the_cpu_has_it(fp32_onnx: Path) -> None:
    bf16 = export.read_metadata(fp32_onnx).parity["bf16"]  # type: ignore[index]
    if openvino.has_bf16():
        assert bf16["top1_agreement"] >= reference.BOUNDS["bf16"]["top1_agreement"]
        assert "top1" in bf16
    else:
        assert bf16 == {"skipped": "this CPU has no bf16 (OpenVINO reports no BF16 capability)"}


def test_openvino_computes_the_export_as_onnx_runtime_does(fp32_onnx: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ours = export.run_openvino(fp32_onnx.read_bytes(), images, "f32")
    assert np.abs(ours - export.run_onnx(str(fp32_onnx), images)).max() < 1e-5


def test_int8_keeps_accuracy_and_records_its_own(
    ckpt: checkpoint.Checkpoint, fp32_onnx: Path, tmp_path: Path, color_eval_folder: Path
) -> None:
    eval_set = evalsets.eval_set_for(ckpt, color_eval_folder)
    fp32_top1 = (
        export.run_onnx(str(fp32_onnx), eval_set.images).argmax(1) == eval_set.targets
    ).mean()
    out = tmp_path / "int8.onnx"
    meta = export.export(
        ckpt,
        out,
        precision="int8",
        eval_set=eval_set,
        calibration=evalsets.calibration_for(ckpt, None),
    )
    assert meta.precision == "int8"
    assert meta.accuracy is not None
    assert meta.accuracy["dataset"] == "val"
    assert meta.accuracy["top1"] >= fp32_top1 - export.INT8_MAX_ACCURACY_DROP
    assert out.stat().st_size < fp32_onnx.stat().st_size / 2
    # Its bound is what export measured of it, never tighter than int8's own.
    assert meta.reference is not None
    bound = meta.reference["eval"]["bounds"]["int8"]
    assert bound["top1_agreement"] <= reference.BOUNDS["int8"]["top1_agreement"]
    assert bound["max_abs_diff"] >= reference.BOUNDS["int8"]["max_abs_diff"]
    # Both runtimes compute the quantised file within it.
    config = runtime_config(Settings(model_path=out, model_precision="int8"))
    OnnxModel.load(config).check_reference()
    OpenVinoModel.load(out, "int8", lanes=1, threads=1).check_reference()


def test_failed_check_writes_nothing(
    ckpt: checkpoint.Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "FP32_MAX_ABS_DIFF", -1.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(ModelError, match="nothing written"):
        export.export(ckpt, out, eval_set=evalsets.eval_set_for(ckpt, None))
    assert list(tmp_path.iterdir()) == []


def test_failed_check_keeps_the_previous_artifact(
    ckpt: checkpoint.Checkpoint, fp32_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(fp32_onnx.read_bytes())
    monkeypatch.setattr(export, "FP16_MIN_AGREEMENT", 1.01)
    with pytest.raises(ModelError, match="fp16 check failed"):
        export.export(ckpt, out, precision="fp16", eval_set=evalsets.eval_set_for(ckpt, None))
    assert out.read_bytes() == fp32_onnx.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_int8_without_calibration_source_is_refused(tmp_path: Path) -> None:
    layout = checkpoint.Checkpoint(
        arch="resnet18",
        state_dict=build("resnet18", num_classes=4).state_dict(),
        labels=list("abcd"),
        recipe=checkpoint.IMAGENET_RECIPE,
    )
    with pytest.raises(ModelError, match="--calib-data"):
        evalsets.calibration_for(layout, None)


@pytest.fixture(scope="module")
def mapped_onnx(
    ckpt: checkpoint.Checkpoint, tmp_path_factory: pytest.TempPathFactory, color_eval_folder: Path
) -> tuple[checkpoint.Checkpoint, Path]:
    """The tiny checkpoint exported at 96x96, so its layer4 maps are 3x3 (at 32x32 they are 1x1):
    the network is convolutional, its weights fit any size."""
    wide = replace(ckpt, recipe=Recipe(resize_size=108, crop_size=96))
    out = tmp_path_factory.mktemp("mapped") / "model.onnx"
    export.export(wide, out, eval_set=evalsets.eval_set_for(wide, color_eval_folder))
    return wide, out


def pytorch_cam(
    ckpt: checkpoint.Checkpoint, images: np.ndarray, class_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's pooled features and class activation maps, read with a forward hook on layer4
    (Zhou et al.: the classifier's weights of the class over layer4's maps)."""
    serving = ServingModel(ckpt.build_model(), ckpt.mean, ckpt.std).eval()
    seen: list[torch.Tensor] = []
    hook = serving.net.layer4.register_forward_hook(lambda module, i, out: seen.append(out))
    with torch.no_grad():
        probabilities = serving(torch.from_numpy(images), torch.full((len(images),), -1))[0]
    hook.remove()
    maps = seen[0].numpy()
    chosen = np.where(class_ids >= 0, class_ids, probabilities.numpy().argmax(1))
    weights = serving.net.fc.weight.detach().numpy()[chosen]
    return maps.mean(axis=(2, 3)), np.einsum("nk,nkhw->nhw", weights, maps)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_embeddings_and_maps_equal_pytorchs_on_every_cpu_runtime(
    mapped_onnx: tuple[checkpoint.Checkpoint, Path], runtime: str
) -> None:
    wide, path = mapped_onnx
    images = np.random.default_rng(3).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    class_ids = np.array([-1, 0, 2, -1], dtype=np.int64)
    embedding, cam = pytorch_cam(wide, images, class_ids)
    model = (
        OnnxModel.load(runtime_config(Settings(model_path=path, providers="cpu")))
        if runtime == "onnxruntime"
        else OpenVinoModel.load(path, "fp32", lanes=1, threads=1)
    )
    model.check_reference()  # the probes' embeddings and maps, as export wrote them
    wanted = frozenset({"embedding", "class_map"})
    outputs = model.run(images, wanted, class_ids)
    assert outputs["class_map"].shape == (4, 3, 3)
    for got, expected in ((outputs["embedding"], embedding), (outputs["class_map"], cam)):
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # Unfed, the class ids default to each image's top class (the file stays runnable by
    # anything that feeds the images alone).
    (top_maps,) = ort.InferenceSession(str(path)).run(["class_map"], {"images": images})
    np.testing.assert_allclose(top_maps[[0, 3]], outputs["class_map"][[0, 3]], atol=1e-5)
    parity = export.read_metadata(path).parity
    assert parity is not None
    assert parity["embedding_min_cosine"] == parity["class_map_min_cosine"] == 1.0


def test_a_file_whose_maps_differ_from_its_reference_is_refused(
    mapped_onnx: tuple[checkpoint.Checkpoint, Path], tmp_path: Path
) -> None:
    _, path = mapped_onnx
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    entry = json.loads(props["reference"])
    entry["extras"]["class_map"][0] = [-v for v in entry["extras"]["class_map"][0]]
    props["reference"] = json.dumps(entry)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(tmp_path / "flipped.onnx"))
    loaded = OnnxModel.load(runtime_config(Settings(model_path=tmp_path / "flipped.onnx")))
    with pytest.raises(ModelError, match="class_map has cosine similarity"):
        loaded.check_reference()
