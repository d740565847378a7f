"""The measured top-1's 95% Wilson interval, and the words the trainer and the page use."""

from __future__ import annotations

import pytest

from core.accuracy import describe, wilson


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    [
        (13, 19, 0.4601, 0.8464),  # the newcomer's 68.4% on 19 images: anywhere from 46% to 85%
        (160, 190, 0.7835, 0.8871),
        (0, 10, 0.0, 0.2775),  # never below 0 or above 1, even at the ends
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval(correct: int, total: int, low: float, high: float) -> None:
    assert wilson(correct, total) == pytest.approx((low, high), abs=1e-4)


def test_no_images_is_an_error_not_an_interval() -> None:
    with pytest.raises(ValueError, match="no images"):
        wilson(0, 0)


def test_few_images_come_with_a_warning() -> None:
    assert describe(13 / 19, 19, wilson(13, 19)) == (
        "68.4% top-1 on 19 images (95% interval 46.0%-84.6%): fewer than 100 validation images, "
        "so a rough figure"
    )
    assert describe(0.842, 190, None) == "84.2% top-1 on 190 images"
