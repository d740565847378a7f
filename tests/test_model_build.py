import logging
from pathlib import Path

import pytest
import torch

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
