"""Heads: what a request wants from each image's row of model outputs, applied by the pipeline
after the batch ran (app.pipeline.pipeline).

A head is built per request from its parameters, so a bad parameter (``top_k`` or ``class_id`` out
of range) is refused before any work, and the pipeline's answer is already the head's. It names the
outputs it reads (``outputs``: a batch computes and copies back the union of its requests') and
reads them by name from each image's row: ``Classify`` the probabilities, ``Embed`` the embedding,
``Explain`` the probabilities and the class activation map of ``class_id`` (-1: the top class).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Hashable, Mapping
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
from PIL import Image

from app.errors import InvalidParameter
from core.contract import CLASS_MAP_NAME, CLASSIFY, EMBEDDING_NAME, OUTPUT_NAME, ModelMetadata
from core.preprocess import Recipe, crop_box

T_co = TypeVar("T_co", covariant=True)


# One image's row of each named output of the model (core.contract.SERVED_OUTPUTS).
Row = Mapping[str, np.ndarray]
# (width, height) of an encoded image as shown (core.preprocess.Decoded.size); None for a crop
# sent ready-made (the protocol's UINT8 input).
Size = tuple[int, int] | None


class Head(Protocol[T_co]):
    outputs: frozenset[str]  # what it reads
    class_id: int  # the class of the images' maps, -1: each image's top class
    offload: bool  # whether its work belongs on a decode thread, not the event loop

    @property
    def cache_key(self) -> Hashable:
        """What it is, parameters and all: an answer cached for one head serves another only
        if they are equal (app.pipeline.cache)."""

    def __call__(self, row: Row, size: Size) -> T_co:
        """One image's answer from its row of the model's outputs."""


class Ranked(NamedTuple):
    """One of an image's top-k classes."""

    label: str
    class_id: int
    score: float


class Rows:
    """The rows themselves: the protocol answers with the outputs asked for, each as it is or
    ranked."""

    offload = False

    def __init__(self, outputs: frozenset[str] = CLASSIFY, class_id: int = -1) -> None:
        self.outputs = outputs
        self.class_id = class_id
        self.cache_key = ("rows", tuple(sorted(outputs)), class_id)

    def __call__(self, row: Row, size: Size) -> Row:
        return row


class Classify:
    """The k best classes of an image, best first; equal scores list the lower class id first."""

    outputs = CLASSIFY
    class_id = -1
    offload = False

    def __init__(self, metadata: ModelMetadata, top_k: int | None, default_top_k: int) -> None:
        """``top_k``: the request's (None: ``default_top_k``, at most the classes); raises
        InvalidParameter out of 1..classes."""
        classes = len(metadata.labels)
        if top_k is None:
            top_k = min(default_top_k, classes)
        elif not 1 <= top_k <= classes:
            raise InvalidParameter(f"top_k={top_k} is out of range 1..{classes} (the classes)")
        self.k = top_k
        self.labels = metadata.labels
        self.cache_key = ("classify", top_k)

    def __call__(self, row: Row, size: Size = None) -> list[Ranked]:
        return self.ranked(row[OUTPUT_NAME])

    def ranked(self, probabilities: np.ndarray) -> list[Ranked]:
        labels = self.labels
        order = np.argsort(-probabilities, kind="stable")[: self.k].tolist()
        scores = probabilities[order].tolist()
        return [Ranked(labels[i], i, score) for i, score in zip(order, scores, strict=True)]


class Embed:
    """An image's embedding, float32[F]: L2-normalised (cosine similarity is then a dot product)
    unless ``normalize`` is false."""

    outputs = frozenset({EMBEDDING_NAME})
    class_id = -1
    offload = False

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self.cache_key = ("embed", normalize)

    def __call__(self, row: Row, size: Size = None) -> np.ndarray:
        vector: np.ndarray = row[EMBEDDING_NAME]
        return normalized(vector) if self.normalize else vector


def normalized(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class Heatmap(NamedTuple):
    class_id: int
    label: str
    width: int
    height: int
    png: str  # base64


class Explained(NamedTuple):
    predictions: list[Ranked]
    heatmap: Heatmap


# The longest side of a heatmap PNG: a browser stretches it over a larger photo; a 12 MP one would
# cost more to encode than the model's run.
MAX_HEATMAP_SIDE = 1024


class Explain:
    """The top-k classes and, over the image, where the model saw ``class_id`` (default: the top
    class): its class activation map, scaled to 0..1, stretched over the region the model saw (the
    centre crop; outside it is transparent) and coloured, as an RGBA PNG of the image's shape
    (its longest side at most ``MAX_HEATMAP_SIDE``) ready to lay over it."""

    outputs = frozenset({OUTPUT_NAME, CLASS_MAP_NAME})
    offload = True  # a PNG per image

    def __init__(
        self, metadata: ModelMetadata, top_k: int | None, default_top_k: int, class_id: int | None
    ) -> None:
        self.classify = Classify(metadata, top_k, default_top_k)
        classes = len(metadata.labels)
        if class_id is not None and not 0 <= class_id < classes:
            raise InvalidParameter(f"class_id={class_id} is out of range 0..{classes - 1}")
        self.class_id = -1 if class_id is None else class_id
        self.labels = metadata.labels
        self.recipe = metadata.recipe
        self.cache_key = ("explain", self.classify.k, self.class_id)

    def __call__(self, row: Row, size: Size) -> Explained:
        predictions = self.classify(row)
        shown = self.class_id if self.class_id >= 0 else predictions[0].class_id
        png, (width, height) = heatmap_png(row[CLASS_MAP_NAME], size, self.recipe)
        heatmap = Heatmap(shown, self.labels[shown], width, height, png)
        return Explained(predictions, heatmap)


def heatmap_png(class_map: np.ndarray, size: Size, recipe: Recipe) -> tuple[str, tuple[int, int]]:
    """The map as a base64 PNG over an image of ``size`` (None: over the crop itself), and the
    PNG's (width, height). A palette PNG whose colours carry their alpha (tRNS): decoded, it is
    RGBA; encoded, one byte a pixel, several times cheaper than colouring and encoding RGBA
    arrays, which cost more than the batch (benchmarks/results/embeddings.md)."""
    values = scaled(class_map)
    crop = recipe.crop_size
    width, height = size if size is not None else (crop, crop)
    shrink = min(1.0, MAX_HEATMAP_SIDE / max(width, height, 1))
    out_w, out_h = max(1, round(width * shrink)), max(1, round(height * shrink))
    # The map covers the crop: place it over the crop's box in the image.
    left, top, right, bottom = (
        (0.0, 0.0, float(width), float(height)) if size is None else crop_box(width, height, recipe)
    )
    box = [round(v * shrink) for v in (left, top, right, bottom)]
    inside = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
    levels = Image.fromarray(np.round(values * (TRANSPARENT - 1)).astype(np.uint8), mode="L")
    canvas = Image.new("L", (out_w, out_h), TRANSPARENT)
    canvas.paste(levels.resize(inside, Image.Resampling.BILINEAR), (box[0], box[1]))
    canvas.putpalette(PALETTE, rawmode="RGBA")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), (out_w, out_h)


def scaled(class_map: np.ndarray) -> np.ndarray:
    """The map's values to 0..1: its minimum to 0 and its maximum to 1 (a flat map is all 0)."""
    low, high = float(class_map.min()), float(class_map.max())
    if high - low <= 0 or not np.isfinite(high - low):
        return np.zeros(class_map.shape, dtype=np.float32)
    result: np.ndarray = ((class_map - low) / (high - low)).astype(np.float32)
    return result


def _coloured(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGBA, blue through green and yellow to red, and more opaque where it is higher."""
    v = values[..., None]
    stops = np.array(
        [[0, 0, 255], [0, 200, 255], [0, 220, 0], [255, 220, 0], [255, 0, 0]], dtype=np.float32
    )
    position = v[..., 0] * (len(stops) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(stops) - 2)
    fraction = (position - low)[..., None]
    rgb = stops[low] * (1 - fraction) + stops[low + 1] * fraction
    alpha = 64 + 191 * v  # the coolest part still shows, faintly
    return np.concatenate([rgb, alpha], axis=-1).round().astype(np.uint8)


# The palette: levels 0..254 of the map, coloured; 255 transparent (outside the crop).
TRANSPARENT = 255
PALETTE = (
    np.concatenate([_coloured(np.linspace(0, 1, TRANSPARENT, dtype=np.float32)), [[0, 0, 0, 0]]])
    .astype(np.uint8)
    .tobytes()
)
