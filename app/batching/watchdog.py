"""The stuck-lane watchdog: a run that outlasts a whole ``request_timeout_ms`` answers nobody in
time, so its requests are answered 504 at once and its lane is reported (``/readyz`` turns 503:
app.batching.admission's ``Lifecycle``) until the run returns. The lane computes nothing else
meanwhile; the other lanes go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from app.errors import DeadlineExceeded

log = logging.getLogger("app.batching.batcher")


class Waiting(Protocol):
    """A queued image, as far as the watchdog cares: the future its request awaits."""

    future: asyncio.Future[Any]


class Watchdog:
    def __init__(
        self,
        request_timeout_ms: float,
        described: Mapping[str, str],
        lane_label: Callable[[ThreadPoolExecutor], str],
        on_stuck: Callable[[str, str | None], None],
    ) -> None:
        """``on_stuck(lane, description)``: a run has outlasted the deadline, or (None) returned."""
        self.request_timeout_ms = request_timeout_ms
        # A run longer than a whole deadline answers nobody in time: its lane is stuck.
        self.after_s = request_timeout_ms / 1000
        self.stuck_lanes: set[ThreadPoolExecutor] = set()
        self._model = f"{described.get('resnet_serve.model', '')}:" + described.get(
            "resnet_serve.model_version", ""
        )
        self._lane_label = lane_label
        self._on_stuck = on_stuck

    def stuck(self, lane: ThreadPoolExecutor, batch: Sequence[Waiting], started: float) -> None:
        """The run has outlasted a whole deadline: answer its requests now (504) and report the
        lane, which computes nothing else until the run returns."""
        seconds = asyncio.get_running_loop().time() - started
        label = self._label(lane)
        self.stuck_lanes.add(lane)
        description = (
            f"{label} has run one batch of {len(batch)} for over {seconds:.3g} s "
            f"(request_timeout_ms={self.request_timeout_ms:g})"
        )
        log.error("a lane is stuck", extra={"lane": label, "batch_size": len(batch)})
        for item in batch:
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded(f"the model run did not return in time: {description}")
                )
        self._on_stuck(label, description)

    def returned(self, lane: ThreadPoolExecutor, started: float) -> None:
        """A stuck lane's run came back: the lane serves again."""
        self.stuck_lanes.discard(lane)
        label = self._label(lane)
        seconds = asyncio.get_running_loop().time() - started
        log.warning("a stuck lane returned", extra={"lane": label, "seconds": round(seconds, 3)})
        self._on_stuck(label, None)

    def _label(self, lane: ThreadPoolExecutor) -> str:
        return f"{self._model}:lane {self._lane_label(lane)}"
