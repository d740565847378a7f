from __future__ import annotations

from pathlib import Path

from app.repository.configs import runtime_config
from app.runtimes.onnxruntime import OnnxModel
from app.settings import Settings
from benchmarks.ceiling import measure


def test_the_ceiling_runs_as_many_batches_at_once_as_the_server_has_lanes(
    model_path: Path,
) -> None:
    model = OnnxModel.load(runtime_config(Settings(model_path=model_path, intra_op_threads=1)))
    row = measure(model, batch_size=2, seconds=0.0, lanes=3)
    # Each of the three lanes runs its minimum of three batches, however fast the model.
    assert (row["lanes"], row["runs"], row["batch_size"]) == (3, 9, 2)
    assert row["images_per_s"] > 0
    assert row["p50_ms"] <= row["p95_ms"]
