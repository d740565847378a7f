"""In-process ONNX Runtime ceiling: throughput and latency per batch size, no HTTP, no decoding.

    PYTHONPATH=. python -m benchmarks.ceiling artifacts/bench/resnet50-random-fp32.onnx

The session is opened by ``OnnxModel.load`` from the same ``Settings`` the server uses, so
threads and graph optimisation are identical; inputs are already-preprocessed uint8 crops.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.main import session_config
from app.session import OnnxModel
from app.settings import Settings

BATCH_SIZES = (1, 2, 4, 8, 16)


def measure(
    model: OnnxModel, batch_size: int, seconds: float, max_runs: int = 1000
) -> dict[str, Any]:
    size = model.metadata.recipe.crop_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    model.predict(images)  # first run of a shape pays for memory planning
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < max_runs and (len(latencies) < 3 or time.perf_counter() < deadline):
        started = time.perf_counter()
        model.predict(images)
        latencies.append(time.perf_counter() - started)
    ms = np.asarray(latencies) * 1000
    return {
        "batch_size": batch_size,
        "runs": len(latencies),
        "images_per_s": batch_size * len(latencies) / float(np.sum(latencies)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
    }


def ceiling(settings: Settings, seconds: float = 3.0) -> list[dict[str, Any]]:
    model = OnnxModel.load(session_config(settings))
    return [measure(model, batch_size, seconds) for batch_size in BATCH_SIZES]


if __name__ == "__main__":
    path = Path(sys.argv[1])
    print(json.dumps(ceiling(Settings(model_path=path)), indent=2))
