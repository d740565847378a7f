"""A model repository for tests: versions of the tiny model whose labels name their version."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.models import LABELS, build_model, image_bytes

NAME = "digits"
PNG = image_bytes(5)


def add_version(
    repository: Path,
    version: int,
    *,
    model: str = NAME,
    name: str | None = None,
    labels: list[str] | None = None,
) -> Path:
    """A version of the folder ``model`` whose labels carry its number, so an answer shows which
    version computed it. ``name``: the model its metadata names (default: the folder's);
    ``labels``: its own instead (versions a rollout compares share their classes)."""
    folder = repository / model / str(version)
    folder.mkdir(parents=True)
    labels = labels or [f"{label}@v{version}" for label in LABELS]
    metadata = {"model_name": name or model, "model_version": f"build-{version}"}
    return build_model(folder / "model.onnx", labels=labels, metadata=metadata)
