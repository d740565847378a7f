"""How far a measured top-1 can be trusted: its 95% Wilson score interval, and the words for it.

A top-1 measured on few images is a rough figure: 13 right of 19 reads as 68.4%, and the truth
is anywhere from 46% to 85%. The interval (Wilson's, which stays inside 0..1 and holds up at
small counts where the normal approximation does not) travels with the figure in the file's
metadata, so the trainer's log, ``/v1/model`` and the page all show how uncertain it is.
"""

from __future__ import annotations

import math

Z_95 = 1.959964  # the standard normal's 97.5th percentile
# Below this many validation images, the figure comes with a warning.
FEW_IMAGES = 100


def wilson(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The 95% Wilson score interval of ``correct / total`` (0..1 each side)."""
    if total <= 0:
        raise ValueError("no images to measure on")
    share = correct / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    spread = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - spread), min(1.0, centre + spread)


def describe(top1: float, images: int, interval: tuple[float, float] | None) -> str:
    """ "84.2% top-1 on 190 images (95% interval 78.3-88.7%)", and a warning under FEW_IMAGES."""
    text = f"{top1:.1%} top-1 on {images} images"
    if interval is not None:
        text += f" (95% interval {interval[0]:.1%}-{interval[1]:.1%})"
    if images < FEW_IMAGES:
        text += f": fewer than {FEW_IMAGES} validation images, so a rough figure"
    return text
