"""Backends in tests: what this CPU can do, the small model both runtimes open, its session
config as a server on two cores would build it, and timings for ``auto`` to choose from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from app.repository.configs import runtime_config
from app.runtimes import openvino, tuning
from app.runtimes.config import RuntimeConfig
from app.runtimes.registry import plan, tuning_entry
from app.settings import Settings
from tests.helpers.models import build_model

OV, ORT = "openvino", "onnxruntime"
# Both answers of this CPU, so every test checks one of them (never neither).
HAS_BF16 = openvino.has_bf16()


def tiny_model(folder: Path) -> Path:
    return build_model(folder / "model.onnx", conv_layers=2)


def config_for(path: Path, **settings: object) -> RuntimeConfig:
    return replace(
        runtime_config(Settings(model_path=path, **settings), cores=2),  # type: ignore[arg-type]
        intra_op_threads=1,
    )


def write_timings(config: RuntimeConfig, timings: dict[str, dict[int, float]]) -> Path:
    """The tuning cache entry ``auto`` reads for ``config`` (app.runtimes.tuning), as if it had
    timed ``timings`` (images per second by batch size; a candidate not named: 1 at each size),
    so that what it serves follows from them, not from this machine's noise."""
    path, key = tuning_entry(config)
    tried, _ = plan(config)
    stored: tuning.Timings = {str(c): dict.fromkeys(key["batch_sizes"], 1.0) for c in tried}
    stored.update(timings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tuning.store(path, key, stored)
    return path
