"""Warm-up before a model version takes requests: every bucket run once on every lane, its
outputs checked, then the batch limit fitted.

The first run of each shape pays for memory planning and kernel selection (and, on CUDA, graph
capture), so no request ever does. The same runs, timed on every lane at once as under load, fit
the batch limit (app.batching.limit) and give admission its first cost per image.
"""

from __future__ import annotations

import logging
import statistics
from functools import partial

from app.batching.admission import CostEstimate
from app.batching.batcher import Batcher
from app.batching.limit import run_seconds, timed_sizes
from app.runtimes.base import Backend

log = logging.getLogger(__name__)


async def warm_up(model: Backend, batcher: Batcher, estimate: CostEstimate) -> dict[int, float]:
    """Warm every bucket, check the outputs and fit the batch limit; the timed seconds by batch
    size. Raises on any failure: the version then never takes a request."""
    sizes = list(batcher.config.buckets)
    lanes = batcher.lanes
    if model.warms_per_thread:  # one after another: each captures its own CUDA graphs
        await lanes.run_on_each([partial(model.warm_up, sizes)] * len(lanes), at_once=False)
    else:  # the lanes share the buckets out and warm the session at once
        work = [partial(model.warm_up, sizes[lane :: len(lanes)]) for lane in range(len(lanes))]
        await lanes.run_on_each(work, at_once=True)
    await lanes.run(lanes.first, partial(model.warm_up_alone, sizes))
    checked = next((size for size in sizes if size >= 2), sizes[0])  # 2 shows padding leaks
    await lanes.run(lanes.first, partial(model.self_check, checked))
    timed = timed_sizes(sizes)
    runs = await lanes.run_on_each([partial(model.time_runs, timed)] * len(lanes), at_once=True)
    seconds = {size: statistics.median(run[size] for run in runs) for size in timed}
    batcher.fit(seconds)
    estimate.observe_batch(batcher.limit, run_seconds(seconds, batcher.limit) / len(lanes))
    return seconds
