"""In-process ONNX Runtime ceiling: throughput and latency per batch size, no HTTP, no decoding.

    PYTHONPATH=. python -m benchmarks.ceiling artifacts/bench/resnet50-random-fp32.onnx

The session is opened by ``OnnxModel.load`` from the same ``Settings`` the server uses, so
threads and graph optimisation are identical, and runs on as many threads at once as the server
has lanes; inputs are already-preprocessed uint8 crops.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from app.repository.configs import concurrent_batches, runtime_config
from app.runtimes.base import Backend
from app.runtimes.onnxruntime import OnnxModel
from app.settings import Settings

BATCH_SIZES = (1, 2, 4, 8, 16)


def measure(
    model: Backend, batch_size: int, seconds: float, lanes: int = 1, max_runs: int = 1000
) -> dict[str, Any]:
    """``lanes`` threads running batches on the one session at once, as the server's lanes do:
    images/s over the wall time, latency per run."""
    size = model.metadata.recipe.crop_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    model.predict(images)  # first run of a shape pays for memory planning
    deadline = time.perf_counter() + seconds

    def lane() -> list[float]:
        latencies: list[float] = []
        while len(latencies) < max_runs and (len(latencies) < 3 or time.perf_counter() < deadline):
            started = time.perf_counter()
            model.predict(images)
            latencies.append(time.perf_counter() - started)
        return latencies

    began = time.perf_counter()
    with ThreadPoolExecutor(lanes) as pool:
        runs = [run for latencies in pool.map(lambda _: lane(), range(lanes)) for run in latencies]
    wall = time.perf_counter() - began
    ms = np.asarray(runs) * 1000
    return {
        "batch_size": batch_size,
        "lanes": lanes,
        "runs": len(runs),
        "images_per_s": batch_size * len(runs) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
    }


def ceiling(settings: Settings, seconds: float = 3.0) -> list[dict[str, Any]]:
    """The server's session and its lanes (one ORT thread each on the CPU by default)."""
    model = OnnxModel.load(runtime_config(settings))
    lanes = concurrent_batches(settings, model.provider)
    return [measure(model, batch_size, seconds, lanes) for batch_size in BATCH_SIZES]


if __name__ == "__main__":
    path = Path(sys.argv[1])
    print(json.dumps(ceiling(Settings(model_path=path)), indent=2))
