"""The committed gRPC stubs are what app/grpc/generate.sh makes from inference.proto now, and the
messages are wire-compatible with Triton's own (tritonclient.grpc's generated classes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2 as triton

from app.grpc import inference_pb2 as ours

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_the_committed_stubs_are_current(tmp_path: Path) -> None:
    script = ROOT / "app" / "grpc" / "generate.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, env=env, timeout=120)
    for name in GENERATED:
        fresh = (tmp_path / "app" / "grpc" / name).read_text()
        committed = (ROOT / "app" / "grpc" / name).read_text()
        assert fresh == committed, f"app/grpc/{name} is stale: run bash app/grpc/generate.sh"


@pytest.mark.parametrize("name", sorted(ours.DESCRIPTOR.message_types_by_name))
def test_every_message_matches_tritons_field_for_field(name: str) -> None:
    def fields(descriptor: object) -> dict[str, tuple[int, int, str]]:
        found = {}
        for field in descriptor.fields:  # type: ignore[attr-defined]
            nested = field.message_type.full_name if field.message_type else ""
            found[field.name] = (field.number, field.type, nested)
        return found

    mine = ours.DESCRIPTOR.message_types_by_name[name]
    theirs = triton.DESCRIPTOR.message_types_by_name[name]
    assert fields(mine) == fields(theirs)
    for nested in mine.nested_types:
        assert fields(nested) == fields(theirs.nested_types_by_name[nested.name])
