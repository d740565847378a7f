"""The gRPC messages are wire-compatible with Triton's own (tritonclient.grpc's generated classes);
tests/integration/test_grpc_stubs_process.py checks that the committed stubs are current."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as triton

from app.grpc import inference_pb2 as ours


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
