from __future__ import annotations

import pytest

from app.batching.limit import fit_batch_limit, run_seconds, target_limit, timed_sizes

# Seconds per run of each size, as warm-up timed them on this repo's 2-core machine, both lanes
# at once (one ORT thread each).
FP32 = {1: 0.075, 2: 0.150, 4: 0.302, 8: 0.602}  # ResNet-50 fp32: flat cost per image
INT8 = {1: 0.0267, 2: 0.0535, 4: 0.108, 8: 0.219}  # ResNet-50 int8: flat
DIGITS = {1: 0.0027, 2: 0.0041, 4: 0.0058, 8: 0.0092}  # the demo model: cheaper with the batch
# A model on one CPU lane that batching still pays for, slow enough that 100 ms comes early.
BATCHES_WELL = {1: 0.100, 2: 0.150, 4: 0.240, 8: 0.400}


@pytest.mark.parametrize(
    ("seconds", "flat_batch_ms", "limit"),
    [
        (FP32, 200, 4),  # the first size at 200 ms: 302 ms, not 602
        (INT8, 200, 8),
        (FP32, 100, 2),
        (INT8, 100, 4),
        (DIGITS, 200, 8),  # batching pays all the way
        (BATCHES_WELL, 100, 8),  # 100 ms reached at once, yet a bigger batch is cheaper
        (FP32, 0, 1),  # where the cost stops falling
        (DIGITS, 0, 8),
        (FP32, 1e9, 8),  # never long enough: always up to the largest
        (INT8, 1e9, 8),
    ],
)
def test_batches_stop_growing_only_where_the_cost_per_image_is_flat(
    seconds: dict[int, float], flat_batch_ms: float, limit: int
) -> None:
    assert fit_batch_limit(seconds, flat_batch_ms) == limit


def test_cost_within_the_slack_of_the_cheapest_counts_as_flat() -> None:
    # 8 is the cheapest per image, by 5%: noise on a busy machine, not a reason to batch.
    seconds = {1: 0.080, 2: 0.160, 4: 0.320, 8: 0.608}
    assert fit_batch_limit(seconds, 0) == 1
    # By 20%, it is.
    seconds = {1: 0.080, 2: 0.160, 4: 0.320, 8: 0.512}
    assert fit_batch_limit(seconds, 0) == 8


def test_one_timed_size_is_the_limit() -> None:
    assert fit_batch_limit({1: 0.5}, 100) == 1


@pytest.mark.parametrize(
    ("buckets", "timed"),
    [
        ((1, 2, 3, 4, 5, 6, 7, 8), [1, 2, 4, 8]),
        ((1, 2, 4, 8, 16, 32), [1, 2, 4, 8, 16, 32]),
        ((3, 6, 12), [3, 12]),
        ((1, 2, 3, 4, 5, 6), [1, 2, 4, 6]),
        ((5,), [5]),
    ],
)
def test_warm_up_times_the_ends_and_the_powers_of_two(
    buckets: tuple[int, ...], timed: list[int]
) -> None:
    assert timed_sizes(buckets) == timed


BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize(
    ("seconds", "target_ms", "limit"),
    [
        (FP32, 1200, 3),  # a quarter: 300 ms; 4 takes 302: 3 (interpolated, 226 ms) fits, 4 not
        (FP32, 1210, 4),
        (FP32, 300, 1),  # 75 ms: one image, just
        (FP32, 100, 1),  # nothing fits: one image all the same, never none
        (DIGITS, 50, 8),  # 12.5 ms: the demo's whole batch fits
        (DIGITS, 20, 3),  # 5 ms: 3 (4.95 ms, between 2 and 4) fits, 4 (5.8 ms) not
        (INT8, 300, 2),  # 75 ms: 2 (53.5 ms), not 3 (81 ms)
    ],
)
def test_a_latency_target_keeps_batches_to_a_quarter_of_it(
    seconds: dict[int, float], target_ms: float, limit: int
) -> None:
    assert target_limit(seconds, BUCKETS, target_ms) == limit


def test_run_seconds_between_and_beyond_the_timed_sizes() -> None:
    assert run_seconds(DIGITS, 4) == DIGITS[4]
    assert run_seconds(DIGITS, 3) == pytest.approx((DIGITS[2] + DIGITS[4]) / 2)
    assert run_seconds({2: 0.01, 4: 0.02}, 1) == 0.01  # below the smallest: the smallest's
    assert run_seconds({2: 0.01, 4: 0.02}, 16) == pytest.approx(0.08)  # the largest per image
