"""Backends in tests: what this CPU can do, the small model both runtimes open, and its session
config as a server on two cores would build it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from app.repository.configs import runtime_config
from app.runtimes import openvino
from app.settings import Settings
from tests.helpers.models import build_model

OV, ORT = "openvino", "onnxruntime"
# Both answers of this CPU, so every test checks one of them (never neither).
HAS_BF16 = openvino.has_bf16()


def tiny_model(folder: Path) -> Path:
    return build_model(folder / "model.onnx", conv_layers=2)


def config_for(path: Path, **settings: object) -> object:
    return replace(
        runtime_config(Settings(model_path=path, **settings), cores=2),  # type: ignore[arg-type]
        intra_op_threads=1,
    )
