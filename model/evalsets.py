"""Which images check an export: its accuracy and parity set, and the INT8 calibration set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ModelError
from model import data
from model.checkpoint import Checkpoint
from model.train import TrainConfig, load_datasets

log = logging.getLogger(__name__)

PARITY_IMAGES = 64  # enough to catch a wrong graph; a 224x224 ResNet-50 checks in seconds
CALIBRATION_IMAGES = 320


@dataclass
class EvalSet:
    """Images to check the export on; ``targets`` only when they carry this model's labels."""

    name: str
    images: np.ndarray
    targets: np.ndarray | None


def eval_set_for(ckpt: Checkpoint, eval_dir: Path | None) -> EvalSet:
    """A labelled folder if given; else the validation split the checkpoint was trained against;
    else real digit scans, which prove the graph (parity) but not the accuracy."""
    if eval_dir is not None:
        split = data.load_folder(eval_dir, ckpt.recipe)
        unknown = sorted(set(split.labels) - set(ckpt.labels))
        if unknown:
            raise ModelError(
                f"--eval-data {eval_dir}: class folders {unknown} are not model labels"
            )
        targets = np.asarray([ckpt.labels.index(split.labels[t]) for t in split.targets])
        return EvalSet(f"{eval_dir.name}", split.images, targets)
    config = _training_config(ckpt)
    if config is not None:
        val = load_datasets(config).val
        return EvalSet(f"{Path(config.data).name}-val", val.images, val.targets)
    _, val = data.digits(recipe=ckpt.recipe)
    return EvalSet("digits-parity", val.images[:PARITY_IMAGES], None)


def calibration_for(ckpt: Checkpoint, calib: str | None) -> np.ndarray:
    """Training images for INT8 calibration: the checkpoint's own training set by default."""
    if calib == data.DIGITS:
        train, _ = data.digits(recipe=ckpt.recipe)
        images = train.images
    elif calib is not None:
        images = data.load_folder(Path(calib), ckpt.recipe).images
    else:
        config = _training_config(ckpt)
        if config is None:
            raise ModelError(
                "int8 needs calibration images: pass --calib-data DIR (training-like images) "
                "or --calib-data digits"
            )
        images = load_datasets(config).train.images
    pick = np.random.default_rng(0).permutation(len(images))[:CALIBRATION_IMAGES]
    return images[np.sort(pick)]


def _training_config(ckpt: Checkpoint) -> TrainConfig | None:
    config = ckpt.extra.get("config")
    if not config:
        return None
    config = TrainConfig(**config)
    if not config.is_digits and not Path(config.data).is_dir():
        log.warning("training data %s is gone; checking parity on digit scans only", config.data)
        return None
    return config
