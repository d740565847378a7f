"""The built-in demo exactly as the first ``make run`` builds it (slow: trains a ResNet-50).

python -m pytest -m slow
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.repository.configs import runtime_config
from app.runtimes.onnxruntime import OnnxModel
from app.settings import Settings
from core.preprocess import decode
from model.export import read_metadata

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_build_reaches_98_percent_and_reads_the_examples(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    command = [sys.executable, "-m", "model", "build", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left for the other" in done.stderr  # the estimate after the first epoch
    assert "torchvision is not installed" not in done.stderr

    accuracy = read_metadata(out).accuracy
    assert accuracy is not None
    assert accuracy["images"] == 360  # the validation split: 20% of the 1,797 scans
    assert accuracy["top1"] >= 0.98

    model = OnnxModel.load(runtime_config(Settings(model_path=out, providers="cpu")))
    examples = sorted((ROOT / "examples").glob("digit-*.png"))
    crops = np.stack([decode(path.read_bytes(), model.metadata.recipe) for path in examples])
    predicted = [model.metadata.labels[i] for i in model.predict(crops).argmax(1)]
    assert predicted == [path.stem.removeprefix("digit-") for path in examples]
