"""The GPU benchmark's whole flow on the CPU (``--quick``, a tiny budget): in-process rows, a real
server under JPEG load, and the three result files; and its refusal to run for real without CUDA."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from benchmarks.gpu.__main__ import main
from benchmarks.gpu.http import environment
from benchmarks.peers.servers import ROOT


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


def check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """benchmarks/gpu/check.sh (make gpu-check) with no wheels but the given ones."""
    values = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "SITE": str(tmp_path / "site")}
    values |= {"WHEELS": str(tmp_path / "none"), "PARTS": str(tmp_path / "parts")} | env
    script = ROOT / "benchmarks" / "gpu" / "check.sh"
    return subprocess.run(
        ["bash", str(script)], env=values, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU machine runs it"
)
def test_gpu_check_without_the_cuda_provider_says_so_and_fails(tmp_path: Path) -> None:
    done = check(tmp_path)
    assert done.returncode == 3, done.stderr
    assert "gpu-check: no CUDAExecutionProvider in onnxruntime" in done.stderr
    assert "make gpu-wheels" in done.stderr


def test_gpu_check_refuses_a_wheel_reassembled_from_wrong_parts(tmp_path: Path) -> None:
    wheel = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl"
    parts, small = tmp_path / "parts", tmp_path / "small"
    parts.mkdir()
    small.mkdir()
    (parts / f"{wheel}.part-0").write_bytes(b"first half")
    # The checksum of the whole wheel, whose second part never arrived.
    digest = hashlib.sha256(b"first half, second half").hexdigest()
    (small / "onnxruntime-gpu.sha256").write_text(f"{digest}  {wheel}\n")
    done = check(tmp_path, WHEELS=f"{small} {parts}", PARTS=str(parts))
    assert done.returncode == 2, done.stderr
    assert "checksum mismatch after reassembly" in done.stderr
    assert not (parts / wheel).exists()  # a later run reassembles afresh
