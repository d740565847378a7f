"""Small real data and a small trained checkpoint for the model/ tests (imported by conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLORS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def write_color_folder(
    root: Path, per_class: int, seed: int, classes: tuple[str, ...] = tuple(COLORS)
) -> Path:
    """ImageFolder of noisy solid-colour photos: easy to learn, so tests see a clear signal."""
    rng = np.random.default_rng(seed)
    for name in classes:
        rgb = COLORS[name]
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
            noise = rng.normal(0, 25, (size[1], size[0], 3))
            pixels = np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(root / name / f"{i}{suffix}")
    return root


@pytest.fixture(scope="session")
def color_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_color_folder(tmp_path_factory.mktemp("colors") / "train", per_class=8, seed=0)


@pytest.fixture(scope="session")
def color_eval_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_color_folder(tmp_path_factory.mktemp("colors-eval") / "val", per_class=4, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, color_folder: Path) -> Path:
    """A resnet18 trained for 3 epochs on the colour folder at 32x32 (a few seconds on CPU)."""
    from model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny") / "checkpoint.pt"
    config = TrainConfig(
        data=str(color_folder),
        arch="resnet18",
        crop_size=32,
        resize_size=36,
        epochs=3,
        batch_size=8,
        lr=3e-3,
        val_fraction=0.25,
        out=str(out),
    )
    return train(config)
