"""The in-process ceiling on the GPU: every variant (precision, CUDA graphs, provider options,
TensorRT where it works) through the server's own ``OnnxModel`` and bound buckets, per bucket."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.repository.configs import batch_buckets, runtime_config
from app.runtimes.onnxruntime import OnnxModel
from app.runtimes.providers import TENSORRT
from app.settings import Settings
from benchmarks.ceiling import measure
from core.errors import ModelError


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, Any]  # Settings fields beside model_path and max_batch_size


# Baseline first, then one change at a time, so each row reads as "this option's effect".
GPU_VARIANTS = (
    Variant("cuda-fp32", {"providers": "cuda", "model_precision": "fp32", "cuda_graphs": False}),
    Variant("cuda-fp32-graphs", {"providers": "cuda", "model_precision": "fp32"}),
    Variant("cuda-fp16", {"providers": "cuda", "model_precision": "fp16", "cuda_graphs": False}),
    Variant("cuda-fp16-graphs", {"providers": "cuda", "model_precision": "fp16"}),
    Variant(
        "cuda-fp16-graphs-nhwc",
        {"providers": "cuda", "model_precision": "fp16", "cuda_prefer_nhwc": True},
    ),
    Variant(
        "cuda-fp16-graphs-heuristic",
        {"providers": "cuda", "model_precision": "fp16", "cuda_conv_algo_search": "heuristic"},
    ),
    Variant("tensorrt-fp16", {"providers": "tensorrt"}),
)
CPU_VARIANTS = (Variant("cpu-fp32", {"providers": "cpu", "model_precision": "fp32"}),)


def run_variant(
    variant: Variant, model: Path, max_batch_size: int, seconds: float
) -> dict[str, Any]:
    """One variant's row: its provider, start-up (load + warm-up) and each bucket's figures."""
    settings = Settings(model_path=model, max_batch_size=max_batch_size, **variant.settings)
    started = time.perf_counter()
    try:
        loaded = OnnxModel.load(runtime_config(settings))
    except ModelError as exc:
        return {"variant": variant.name, "skipped": str(exc)}
    buckets = batch_buckets(settings, loaded.provider)
    loaded.bind(buckets)
    loaded.warm_up(buckets)  # cuDNN's search, graph capture, TensorRT's engine: all here
    startup_s = time.perf_counter() - started
    if variant.settings["providers"] == "tensorrt" and loaded.provider != TENSORRT:
        return {"variant": variant.name, "skipped": f"TensorRT fell back to {loaded.provider}"}
    return {
        "variant": variant.name,
        "provider": loaded.provider,
        "precision": loaded.metadata.precision,
        "startup_s": startup_s,
        "buckets": [measure(loaded, bucket, seconds) for bucket in buckets],
    }
