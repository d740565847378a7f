"""Evaluation preprocessing: bytes -> uint8 HWC RGB crop. The one implementation, torch-free.

The exporter's accuracy and parity checks call it too (``model/``), so the server and the
measured accuracy can never disagree about resizing, cropping or colour conversion.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import EmptyUpload, InvalidImage, TooManyPixels, UnsupportedMediaType

# HEIC/HEIF (every iPhone photo): Pillow has no decoder of its own; pillow-heif adds one as the
# "HEIF" plugin. AVIF is Pillow's own (since 11.3).
pillow_heif.register_heif_opener()

# Pillow's plugin names; Image.open never even tries the others (PSD, EPS, ICO, ...).
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF")
# The file names the folder client and the trainer pick up from a folder: these formats' suffixes.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)
# Pillow refuses images over twice Image.MAX_IMAGE_PIXELS itself, before our own limit is read.
_POSSIBLE_BOMB = re.compile(r"Image size \((\d+) pixels\)")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Transparent pixels become white: a drawing or product shot on a clear background is dark on white.
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Recipe:
    """How an image becomes the model's input; stored in the ONNX metadata as JSON."""

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop_size < 1 or self.resize_size < self.crop_size:
            raise ValueError(
                f"need 1 <= crop_size <= resize_size, got crop_size={self.crop_size}, "
                f"resize_size={self.resize_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(
            resize_size=int(data["resize_size"]),
            crop_size=int(data["crop_size"]),
            interpolation=str(data.get("interpolation", "bilinear")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = DEFAULT_FORMATS


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Identify the format and check the pixel count from the header, before any decoding."""
    if not data:
        raise EmptyUpload("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many(exc, limits) from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(limits.formats)
        raise UnsupportedMediaType(f"not an image in an allowed format ({allowed})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot read the image header: {exc}") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels} (max_image_pixels)"
        )
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    return image


def _too_many(exc: Exception, limits: Limits) -> TooManyPixels:
    """Pillow's own bomb refusal, worded with the limit the operator set, not Pillow's."""
    found = _POSSIBLE_BOMB.search(str(exc))
    size = f"{found.group(1)} pixels" if found else "more pixels than Pillow decodes"
    return TooManyPixels(
        f"image is {size}, over the limit of {limits.max_pixels} (max_image_pixels)"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, transparency composited onto white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P":
        # Palette images may carry transparency as a palette index; RGBA keeps it.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" and array.max(initial=0.0) <= 1.0 else 65535.0
    scaled = np.clip(array * (255.0 / top), 0, 255)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def crop_box(width: int, height: int, recipe: Recipe) -> tuple[float, float, float, float]:
    """The source region kept by "resize shorter side, then center crop" (torchvision rounding)."""
    if width <= height:
        resized_w, resized_h = recipe.resize_size, int(recipe.resize_size * height / width)
    else:
        resized_w, resized_h = int(recipe.resize_size * width / height), recipe.resize_size
    top = round((resized_h - recipe.crop_size) / 2.0)
    left = round((resized_w - recipe.crop_size) / 2.0)
    # Map the crop back through the per-axis scale the resize would have used.
    scale_x, scale_y = width / resized_w, height / resized_h
    return (
        left * scale_x,
        top * scale_y,
        (left + recipe.crop_size) * scale_x,
        (top + recipe.crop_size) * scale_y,
    )


def to_model_input(image: Image.Image, recipe: Recipe) -> np.ndarray:
    """Decoded image -> uint8[S, S, 3]: EXIF orientation, RGB, resize shorter side, center crop.

    The crop is resampled straight from the source region, so a 1x100000 strip never
    becomes a huge intermediate image.
    """
    image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    box = crop_box(image.width, image.height, recipe)
    size = (recipe.crop_size, recipe.crop_size)
    crop = image.resize(size, INTERPOLATIONS[recipe.interpolation], box=box)
    return np.asarray(crop, dtype=np.uint8)


def _drafted(image: Image.Image, recipe: Recipe) -> Image.Image:
    if image.format == "JPEG":
        # DCT-domain downscale: a 12 MP photo decoded at 1/8 costs a fraction of a full decode.
        target = 2 * recipe.resize_size
        image.draft(None, (target, target))
    return image


def decode_cost(data: bytes, recipe: Recipe, limits: Limits = Limits()) -> int:
    """Pixels a decode of ``data`` will produce (after JPEG draft scaling), from the header only."""
    width, height = _drafted(open_image(data, limits), recipe).size
    return width * height


def decode(data: bytes, recipe: Recipe, limits: Limits = Limits()) -> np.ndarray:
    """Untrusted bytes -> model input, or an error that names the problem."""
    return decode_counted(data, recipe, limits).crop


class Decoded(NamedTuple):
    crop: np.ndarray
    pixels: int  # decoded: what the decode cost
    format: str
    scale: int  # the JPEG draft's reduction (1: decoded at full size)
    # (width, height) as displayed: the full-size image, turned by its EXIF orientation. The crop
    # came from ``crop_box(*size, recipe)`` of it.
    size: tuple[int, int] = (0, 0)


# EXIF orientations that turn the image a quarter (its width and height swap).
_QUARTER_TURNS = {5, 6, 7, 8}


def _turned(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112) in _QUARTER_TURNS
    except Exception:  # an unreadable EXIF block: exif_transpose leaves such an image as it is
        return False


def decode_counted(data: bytes, recipe: Recipe, limits: Limits = Limits()) -> Decoded:
    """``decode``, and what it decoded."""
    image = open_image(data, limits)
    try:
        raw_width, raw_height = image.size
        shown = (raw_height, raw_width) if _turned(image) else (raw_width, raw_height)
        _drafted(image, recipe)
        image.seek(0)
        image.load()
        scale = max(1, round(raw_width / max(image.width, 1)))
        crop = to_model_input(image, recipe)
        pixels = image.width * image.height
        return Decoded(crop, pixels, image.format or "", scale, shown)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many(exc, limits) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"corrupt or truncated {image.format} image: {exc}") from exc
