"""Reference outputs, written into the file's metadata at export (``reference``), so the server
checks that a version it opens computes what was measured offline, on its own runtime, provider
and precision, before that version takes a request.

Two parts. ``probe``/``top``: what the file answered for two fixed probe images, made by integer
arithmetic (both sides build the same bytes whatever their numpy). ``eval``: a few images of the
evaluation set export already uses (PNG, within ``BUDGET`` bytes), their fp32 top classes, and
the bounds each precision must meet on them: top-1 agreement with fp32 and the largest difference
in a reference class's probability. The reference is the fp32 file on ONNX Runtime's CPU
provider, which export has already compared with PyTorch.

Why the metadata and not a sidecar file: the file stays the one contract that images, Kubernetes
jobs and KServe copy around (a sidecar left behind would stop every start-up), and PNG keeps the
images of a 224x224 model to about 1% of a ResNet-50 file.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

PROBE = "gradient+checker/1"
TOP = 5
# Largest difference allowed in a probe's reference class's probability, by the precision computed.
TOLERANCE = {"fp32": 0.01, "fp16": 0.03, "bf16": 0.03, "int8": 0.05}
COUNT = 32  # evaluation images at most
BUDGET = 1_000_000  # their PNG bytes at most (a 224x224 photo is ~100 KB: about 10 of them)
# What each precision must meet on the evaluation images against fp32, unless export recorded
# looser bounds for a file it measured (its own precision, e.g. an int8 file). fp32 as export's
# own ORT-vs-PyTorch check; bf16 and fp16 round: one near-tie in 32 may flip.
BOUNDS = {
    "fp32": {"top1_agreement": 1.0, "max_abs_diff": 1e-4},
    "bf16": {"top1_agreement": 0.96, "max_abs_diff": 0.05},
    "fp16": {"top1_agreement": 0.96, "max_abs_diff": 0.05},
    "int8": {"top1_agreement": 0.9, "max_abs_diff": 0.1},
}


# The outputs beside the probabilities (core.contract): each probe's embedding and its top class's
# map, held to a cosine similarity with the file's own by the precision computed (scale-free:
# the pooled features of different models differ in size by orders of magnitude).
EXTRAS = ("embedding", "class_map")
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.995, "bf16": 0.99, "int8": 0.95}


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


def extras_entry(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``extras`` part: each probe's embedding, and the map of its top class, as the file
    computes them (``outputs``: its named outputs for ``probe_images``, class ids -1)."""
    return {name: [_rounded(row.ravel()) for row in outputs[name]] for name in EXTRAS}


def extras_mismatch(
    entry: dict[str, Any], outputs: dict[str, np.ndarray], precision: str
) -> str | None:
    """Why the probes' embeddings and maps (``outputs``) differ from ``entry``; None if they do
    not."""
    bound = MIN_COSINE[precision]
    try:
        for name in EXTRAS:
            expected = np.asarray(entry[name], dtype=np.float64)
            computed = outputs[name].reshape(len(expected), -1)
            worst = min(_cosine(a, b) for a, b in zip(expected, computed, strict=True))
            if worst < bound:
                return (
                    f"it does not compute what was exported: a probe's {name} has cosine "
                    f"similarity {worst:.5f} with the file's reference (bound {bound} for "
                    f"{precision})"
                )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        return f"its metadata 'reference' does not fit its outputs: {exc}"
    return None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {list(b.shape)}, the reference has {list(a.shape)}")
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0:  # both all zeros agree; one of them alone does not
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b.astype(np.float64)) / norms)


def _rounded(values: np.ndarray) -> list[float]:
    # Six significant digits: exact enough for any bound above, a third of the JSON of repr.
    return [float(f"{value:.6g}") for value in values.tolist()]


def eval_entry(
    images: np.ndarray,
    probabilities: np.ndarray,
    dataset: str,
    own: tuple[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The ``eval`` part: the first images (spread over the set) that fit ``BUDGET``, their fp32
    top classes, and per precision its bounds. ``own``: a file that is not fp32, its precision and
    its probabilities on ``images``: what it measures on the chosen images loosens its precision's
    bound (never tightens it), so the file always meets its own reference."""
    picked = np.unique(np.linspace(0, len(images) - 1, min(COUNT, len(images))).astype(int))
    encoded: list[str] = []
    used = 0
    for index in picked:
        png = _png(images[index])
        if encoded and used + len(png) > BUDGET:
            break
        encoded.append(base64.b64encode(png).decode("ascii"))
        used += len(png)
    chosen = picked[: len(encoded)]
    bounds = {name: dict(bound) for name, bound in BOUNDS.items()}
    if own is not None:
        name, probs = own
        fp32, mine = probabilities[chosen], probs[chosen]
        agreement = float((fp32.argmax(axis=1) == mine.argmax(axis=1)).mean())
        # One more flip than measured, and twice the measured difference: other runtimes round
        # a quantised graph differently, not wrongly.
        bound = bounds[name]
        bound["top1_agreement"] = min(bound["top1_agreement"], agreement - 1 / len(chosen))
        bound["max_abs_diff"] = max(bound["max_abs_diff"], 2 * float(np.abs(fp32 - mine).max()))
    return {
        "dataset": dataset,
        "images": encoded,
        "top": entry_for(probabilities[chosen])["top"],
        "bounds": bounds,
    }


def eval_images(entry: dict[str, Any]) -> np.ndarray:
    """uint8[N, S, S, 3]: the ``eval`` part's images. Raises ValueError (or KeyError, TypeError)
    for an entry that is not one ``eval_entry`` wrote."""
    if len(entry["images"]) != len(entry["top"]) or not entry["images"]:
        raise ValueError(f"{len(entry['images'])} images for {len(entry['top'])} answers")
    decoded = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))) for data in entry["images"]
    ]
    return np.stack(decoded).astype(np.uint8)


def judge(entry: dict[str, Any], probabilities: np.ndarray, precision: str) -> str | None:
    """Why ``probabilities`` (of ``eval_images``) break the ``eval`` part's bounds for
    ``precision``; None when they meet them."""
    bound = entry.get("bounds", {}).get(precision, BOUNDS[precision])
    top1 = probabilities.argmax(axis=1)
    agreement = float(
        np.mean([row[0][0] == int(got) for row, got in zip(entry["top"], top1, strict=True)])
    )
    worst = max(
        abs(float(answer[cls]) - probability)
        for answer, expected in zip(probabilities, entry["top"], strict=True)
        for cls, probability in expected
    )
    if agreement < bound["top1_agreement"] or worst > bound["max_abs_diff"]:
        return (
            f"it does not compute what was exported: on {len(top1)} evaluation images "
            f"({entry.get('dataset', '?')}) top-1 agreement with fp32 {agreement:.1%} (bound "
            f"{bound['top1_agreement']:.1%}), largest probability difference {worst:.2g} (bound "
            f"{bound['max_abs_diff']:.2g}) for {precision}"
        )
    return None


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


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
