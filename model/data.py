"""Datasets as uint8 HWC crops made by the server's own preprocessing (``core.preprocess``).

Two sources: the handwritten digits that ship inside scikit-learn (the built-in demo, no download),
and an ImageFolder directory ``root/<class_name>/*.jpg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ModelError, ServiceError
from core.preprocess import IMAGE_SUFFIXES, Recipe, decode, to_model_input

DIGITS = "digits"
DIGITS_LABELS = [str(d) for d in range(10)]
# The sklearn scans are 8x8, so 16x16 loses nothing; a training step costs ~0.55x of one at
# 32x32 on the CPU (the stages end at 1x1), which keeps the first `make run` short.
DIGITS_RECIPE = Recipe(resize_size=16, crop_size=16, interpolation="bilinear")


@dataclass
class Split:
    """Preprocessed images, ready for a forward pass: uint8[N, S, S, 3] and int64[N]."""

    images: np.ndarray
    targets: np.ndarray
    labels: list[str]

    def __len__(self) -> int:
        return len(self.targets)


def digit_images(
    seed: int = 0, val_fraction: float = 0.2
) -> tuple[list[Image.Image], list[int], list[Image.Image], list[int]]:
    """The 1,797 scans as dark-on-white 8x8 greyscale images, split in a seeded stratified way.

    Returns (train_images, train_targets, val_images, val_targets).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 ink density -> 8-bit greyscale, ink dark on white, like a scan or a drawing.
    pixels = (255 - np.round(digits.images * (255 / 16))).astype(np.uint8)
    images = [Image.fromarray(p, mode="L") for p in pixels]
    train_x, val_x, train_y, val_y = train_test_split(
        images, digits.target, test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    return train_x, list(train_y), val_x, list(val_y)


def digits(
    seed: int = 0, val_fraction: float = 0.2, recipe: Recipe = DIGITS_RECIPE
) -> tuple[Split, Split]:
    train_x, train_y, val_x, val_y = digit_images(seed, val_fraction)
    return _split(train_x, train_y, recipe), _split(val_x, val_y, recipe)


def digits_nearest_upscale(
    seed: int = 0, val_fraction: float = 0.2, recipe: Recipe = DIGITS_RECIPE
) -> Split:
    """Training digits upscaled with NEAREST: like a user's blocky, enlarged digit PNG."""
    train_x, train_y, _, _ = digit_images(seed, val_fraction)
    size = (recipe.crop_size, recipe.crop_size)
    blocky = [im.resize(size, Image.Resampling.NEAREST) for im in train_x]
    return _split(blocky, train_y, recipe)


def _split(images: list[Image.Image], targets: list[int], recipe: Recipe) -> Split:
    arrays = np.stack([to_model_input(im, recipe) for im in images])
    return Split(arrays, np.asarray(targets, dtype=np.int64), DIGITS_LABELS)


def scan_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``root/<class>/*.<image suffix>`` -> (path, class index) pairs and sorted class names."""
    if not root.is_dir():
        raise ModelError(f"dataset {root}: not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ModelError(f"dataset {root}: no class folders (expected {root}/<class_name>/*.jpg)")
    items: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ModelError(
                f"dataset {root}: class folder {name!r} has no images "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        items += [(f, index) for f in files]
    return items, classes


def load_folder(root: Path, recipe: Recipe) -> Split:
    """Decode a whole ImageFolder with the serving preprocessing; name the first unreadable file."""
    items, classes = scan_folder(root)
    arrays = []
    for path, _ in items:
        try:
            arrays.append(decode(path.read_bytes(), recipe))
        except (ServiceError, OSError) as exc:
            raise ModelError(f"dataset {root}: cannot read image {path}: {exc}") from exc
    targets = np.asarray([index for _, index in items], dtype=np.int64)
    return Split(np.stack(arrays), targets, classes)


def split_seeded(data: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """A stratified train/validation split that is the same for the same seed."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(data.targets)
    stratify = data.targets if counts.min() >= 2 else None
    index = np.arange(len(data))
    train_i, val_i = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=stratify
    )

    def pick(i: np.ndarray) -> Split:
        return Split(data.images[i], data.targets[i], data.labels)

    return pick(train_i), pick(val_i)
