"""Reference outputs: what the exported file answered for two fixed probe images, written into its
metadata at export (``reference``), so the server can check a version it opens computes the same
on its own runtime and provider before that version takes a request.

The probes are made by integer arithmetic, not a random generator, so both sides build the same
bytes whatever their numpy. The reference is that very file on ONNX Runtime's CPU provider, which
export has already compared with PyTorch; the tolerances cover the rounding of other providers and
precisions (CUDA, TensorRT, OpenVINO's bf16), not a different computation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROBE = "gradient+checker/1"
TOP = 5
# Largest difference allowed in a reference class's probability, by the file's precision.
TOLERANCE = {"fp32": 0.01, "fp16": 0.03, "int8": 0.05}


def probe_images(crop_size: int) -> np.ndarray:
    """uint8[2, S, S, 3]: a colour gradient and a coloured checkerboard."""
    rows, cols = np.indices((crop_size, crop_size))
    gradient = np.stack(
        [
            rows * 255 // max(crop_size - 1, 1),
            cols * 255 // max(crop_size - 1, 1),
            (rows + cols) % 256,
        ],
        axis=-1,
    )
    cell = max(crop_size // 8, 1)
    checker = ((rows // cell + cols // cell) % 2)[..., None] * np.array([200, 60, 120])
    return np.stack([gradient, checker + 30]).astype(np.uint8)


def entry_for(probabilities: np.ndarray) -> dict[str, Any]:
    """The metadata entry: each probe's top classes with their probabilities."""
    top = np.argsort(-probabilities, axis=1)[:, :TOP]
    return {
        "probe": PROBE,
        "top": [
            [[int(c), round(float(row[c]), 6)] for c in classes]
            for row, classes in zip(probabilities, top, strict=True)
        ],
    }


def mismatch(entry: dict[str, Any], probabilities: np.ndarray, precision: str) -> str | None:
    """Why ``probabilities`` (of ``probe_images``) do not match ``entry``; None when they do."""
    if entry.get("probe") != PROBE:
        return None  # made with probes this code does not know: nothing to compare
    tolerance = TOLERANCE[precision]
    worst = 0.0
    try:
        for row, expected in zip(probabilities, entry["top"], strict=True):
            for cls, probability in expected:
                worst = max(worst, abs(float(row[cls]) - probability))
    except (IndexError, TypeError, ValueError):
        return f"its metadata 'reference' does not fit its output: {str(entry)[:80]}"
    if worst > tolerance:
        return (
            f"it does not compute what was exported: a probe's probabilities differ from the "
            f"file's reference by up to {worst:.4f} (tolerance {tolerance} for {precision})"
        )
    return None
