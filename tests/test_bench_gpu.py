"""The GPU benchmark's whole flow on the CPU (``--quick``, a tiny budget): in-process rows, a real
server under JPEG load, and the three result files; and its refusal to run for real without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from benchmarks.gpu.__main__ import main
from benchmarks.gpu.http import environment


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU machine runs it"
)
def test_without_cuda_only_the_quick_run_is_allowed(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(model_path), "--out", str(tmp_path)]) == 3
    assert "no CUDAExecutionProvider" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_quick_run_writes_json_markdown_and_png(model_path: Path, tmp_path: Path) -> None:
    argv = ["--quick", "--model", str(model_path), "--out", str(tmp_path), "--name", "smoke"]
    budget = ["--seconds", "0.05", "--concurrency", "1", "--load-seconds", "0.3"]
    assert main([*argv, *budget, "--load-warmup-s", "0.1"]) == 0
    results = json.loads((tmp_path / "gpu-smoke.json").read_text())
    (row,) = results["inprocess"]
    assert row["provider"] == "CPUExecutionProvider"
    assert [b["batch_size"] for b in row["buckets"]] == [1, 2]
    (run,) = results["http"]
    (served,) = run["points"]
    assert served["statuses"].get("200", 0) > 0, served
    assert "| cpu-fp32 | CPU |" in (tmp_path / "gpu-smoke.md").read_text()
    assert (tmp_path / "gpu-smoke.png").read_bytes().startswith(b"\x89PNG")


def test_workers_is_passed_only_when_more_than_one(model_path: Path) -> None:
    assert "RESNET_SERVE_WORKERS" not in environment(model_path, 8000, 1, {})
    assert environment(model_path, 8000, 4, {"providers": "cuda"})["RESNET_SERVE_WORKERS"] == "4"
    assert environment(model_path, 8000, 4, {"providers": "cuda"})["RESNET_SERVE_PROVIDERS"] == (
        "cuda"
    )
