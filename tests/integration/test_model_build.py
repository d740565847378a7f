import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from core.errors import ModelError
from model.build import BuildConfig, build
from model.export import read_metadata


def test_build_is_cached_on_its_inputs(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "model.onnx"
    config = BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint))
    build(config)
    first = out.stat().st_mtime_ns
    assert read_metadata(out).labels == ("blue", "green", "red")

    with caplog.at_level(logging.INFO, logger="model.build"):
        build(config)
    assert out.stat().st_mtime_ns == first
    assert "up to date" in caplog.text

    build(BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint), force=True))
    assert out.stat().st_mtime_ns != first


def test_build_names_the_model_and_records_the_accuracy_interval(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    build(BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint), name="shapes"))
    metadata = read_metadata(out)
    assert metadata.name == "shapes"  # what a repository folder of that name serves
    assert metadata.accuracy is not None
    low, high = metadata.accuracy["top1_ci95"]
    assert 0 <= low <= metadata.accuracy["top1"] <= high <= 1
    with pytest.raises(ModelError, match="name 'no/slash'"):
        build(BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint), name="no/slash"))


def test_changed_checkpoint_or_precision_rebuilds(tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(tiny_checkpoint.read_bytes())
    out = tmp_path / "model.onnx"
    build(BuildConfig(out=str(out), checkpoint=str(source)))
    first = read_metadata(out).source_sha256

    raw = torch.load(source, weights_only=True)
    torch.save({**raw, "seed": raw["seed"] + 1}, source)  # same path, new bytes
    build(BuildConfig(out=str(out), checkpoint=str(source)))
    assert read_metadata(out).source_sha256 != first

    build(BuildConfig(out=str(out), checkpoint=str(source), precision="fp16"))
    assert read_metadata(out).precision == "fp16"


def test_also_writes_each_precision_beside_out_and_caches_each(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    build(BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint)))
    fp32_written = out.stat().st_mtime_ns

    build(BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint), also="fp16"))
    sibling = tmp_path / "model.fp16.onnx"
    assert read_metadata(sibling).precision == "fp16"
    assert read_metadata(out).precision == "fp32"
    assert out.stat().st_mtime_ns == fp32_written  # the fp32 file was up to date


@pytest.mark.parametrize(
    ("precision", "also"),
    [("fp32", "fp32"), ("fp32", "fp16,fp16"), ("fp32", "bf16")],
    ids=["repeats-precision", "repeats-itself", "unknown"],
)
def test_bad_also_is_refused_before_any_work(
    tiny_checkpoint: Path, tmp_path: Path, precision: str, also: str
) -> None:
    config = BuildConfig(
        out=str(tmp_path / "m.onnx"),
        checkpoint=str(tiny_checkpoint),
        precision=precision,
        also=also,
    )
    with pytest.raises(ModelError, match="precision"):
        build(config)
    assert not list(tmp_path.glob("*.onnx"))


def test_int8_calibrates_on_calib_data_when_the_training_set_is_gone(
    tiny_checkpoint: Path, color_folder: Path, tmp_path: Path
) -> None:
    source = tmp_path / "moved.pt"
    raw = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**raw, "config": {**raw["config"], "data": str(tmp_path / "gone")}}, source)
    out = tmp_path / "model.int8.onnx"
    without = BuildConfig(out=str(out), checkpoint=str(source), precision="int8")
    with pytest.raises(ModelError, match="--calib-data"):
        build(without)
    build(BuildConfig(**{**vars(without), "calib_data": str(color_folder)}))
    assert read_metadata(out).precision == "int8"


def test_training_options_without_data_are_refused_before_any_work(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    config = BuildConfig(out=str(out), checkpoint=str(tiny_checkpoint), lr=1e-3, image_size=64)
    with pytest.raises(ModelError, match="crop_size, lr: options of training, and --checkpoint"):
        build(config)
    assert not out.exists()


def test_build_trains_a_folder_at_the_size_and_settings_asked(
    color_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "colors.onnx"
    config = BuildConfig(
        out=str(out),
        data=str(color_folder),
        name="colors",
        image_size=32,
        epochs=1,
        lr=1e-3,
        batch_size=4,
        val_fraction=0.25,
    )
    build(config)
    metadata = read_metadata(out)
    assert (metadata.name, metadata.preprocessing.recipe.crop_size) == ("colors", 32)
    assert metadata.labels == ("blue", "green", "red")
    stamp = out.with_name(out.name + ".build.json").read_text()
    assert '"image_size": 32' in stamp  # the stamp records what it was built with
    with pytest.raises(ModelError, match=r"image size must be 16\.\.1024 pixels, got 8"):
        build(dataclasses.replace(config, image_size=8))
