"""How many images one batch may take: fitted to the model's timings at warm-up.

With a latency target (``latency_target_ms``), batches are also kept short enough for it: at most
the largest bucket whose run, as last measured, takes ``TARGET_BATCH_SHARE`` of the target
(``target_limit``); the batcher re-applies it as its runs are timed under load.

A bigger batch pays where it cuts the cost per image (a GPU, a small model whose per-call
overhead dominates). Where it does not (fp32 ResNet-50 on a one-thread CPU lane costs about as
much per image alone as in a batch of 8), it only makes a request that just missed a batch wait
for a longer one, which shows in the p99 (docs/workers.md, benchmarks/results/batch_limit.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# A bigger batch counts as cheaper when its cost per image is more than this fraction above
# the cheapest timed: warm-up timings on a busy machine move by a few percent.
COST_SLACK = 0.10
# With a latency target, one batch's run may take this share of it: a request can wait for the
# batch its lane is running, then run in its own, beside its decode, hand-offs and answer.
TARGET_BATCH_SHARE = 0.25


def timed_sizes(buckets: Sequence[int]) -> list[int]:
    """The batch sizes warm-up times: the smallest, the largest and the powers of two between,
    so a fit costs a few runs whatever the number of buckets."""
    return sorted({buckets[0], buckets[-1], *(b for b in buckets if b & (b - 1) == 0)})


def fit_batch_limit(seconds: Mapping[int, float], flat_batch_ms: float) -> int:
    """The most images a batch takes, given each timed size's run in ``seconds``.

    Batches grow to the largest size, except where the cost per image stops falling: there
    they stop at the first size whose run takes ``flat_batch_ms``, long enough that the hand-
    offs around each batch (a few ms under load: the lane waits for the event loop) stay small
    beside it.
    """
    sizes = sorted(seconds)
    cheapest = min(seconds[size] / size for size in sizes)
    flat = next(s for s in sizes if seconds[s] / s <= cheapest * (1 + COST_SLACK))
    long_enough = next((s for s in sizes if seconds[s] * 1000 >= flat_batch_ms), sizes[-1])
    return max(flat, long_enough)


def run_seconds(seconds: Mapping[int, float], size: int) -> float:
    """A run of ``size`` images, from the sizes measured: linear between the nearest two, and
    beyond the largest at the largest's cost per image."""
    sizes = sorted(seconds)
    if size in seconds:
        return seconds[size]
    below = [s for s in sizes if s < size]
    above = [s for s in sizes if s > size]
    if not above:
        last = sizes[-1]
        return seconds[last] / last * size
    if not below:
        return seconds[above[0]]
    low, high = below[-1], above[0]
    share = (size - low) / (high - low)
    return seconds[low] + share * (seconds[high] - seconds[low])


def target_limit(seconds: Mapping[int, float], buckets: Sequence[int], target_ms: float) -> int:
    """The largest bucket whose run fits ``TARGET_BATCH_SHARE`` of the latency target; the
    smallest bucket where none does (a batch of one is never refused for its length)."""
    budget_s = TARGET_BATCH_SHARE * target_ms / 1000
    fitting = [b for b in buckets if run_seconds(seconds, b) <= budget_s]
    return max(fitting, default=buckets[0])
