"""A model repository for tests: versions of the tiny model whose labels name their version."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.models import LABELS, build_model, image_bytes

NAME = "digits"
PNG = image_bytes(5)


def add_version(
    repository: Path, version: int, *, name: str = NAME, labels: list[str] | None = None
) -> Path:
    """A version whose labels carry its number, so an answer shows which version computed it;
    ``labels``: its own instead (versions a rollout compares share their classes)."""
    folder = repository / NAME / str(version)
    folder.mkdir(parents=True)
    labels = labels or [f"{label}@v{version}" for label in LABELS]
    metadata = {"model_name": name, "model_version": f"build-{version}"}
    return build_model(folder / "model.onnx", labels=labels, metadata=metadata)
