"""The committed gRPC stubs are what app/grpc/generate.sh makes from inference.proto now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_the_committed_stubs_are_current(tmp_path: Path) -> None:
    script = ROOT / "app" / "grpc" / "generate.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, env=env, timeout=120)
    for name in GENERATED:
        fresh = (tmp_path / "app" / "grpc" / name).read_text()
        committed = (ROOT / "app" / "grpc" / name).read_text()
        assert fresh == committed, f"app/grpc/{name} is stale: run bash app/grpc/generate.sh"
