"""The lone-request fast path: work a request alone on the server does on the event loop.

A request with the server to itself (nothing else admitted, queued or computing:
``Batcher.alone``) pays two thread hand-offs for nothing: to a decode thread and back, to an
inference lane and back. Where the work is known to be short, it runs on the loop instead, which
then stalls that long (benchmarks/results/lanes.md). One setting, ``inline_max_ms``, bounds both
halves, each predicted from what the same work cost last time:

- **decode**: the image's pixels (from its header) at the last decode's seconds per pixel;
- **batch**: the lone batch's last run of the same bucket. This half needs the session that
  spins for lone batches (``ort_spinning=adaptive`` on the CPU, with more than one thread for it:
  app.engine.session), since a lone batch on a session that never spins is slow to wake anyway;
  elsewhere a lone batch runs on a lane like any other.

``inline_max_ms=0`` turns both off.
"""

from __future__ import annotations

import math


class Inline:
    def __init__(self, max_ms: float, batches: bool) -> None:
        """``batches``: whether lone batches may run inline (there is a lone-batch session)."""
        self.max_ms = max_ms
        self.batches = batches and max_ms > 0
        self._seconds_per_pixel: float | None = None  # of the last decode
        self._batch_seconds: dict[int, float] = {}  # of the last lone batch, by bucket

    def decoded(self, pixels: int, seconds: float) -> None:
        self._seconds_per_pixel = seconds / max(pixels, 1)

    def decodes(self, pixels: int) -> bool:
        """Whether an image of ``pixels`` decodes on the loop (its request being alone)."""
        rate = self._seconds_per_pixel
        return bool(self.max_ms) and rate is not None and pixels * rate * 1000 < self.max_ms

    def ran_batch(self, bucket: int, seconds: float) -> None:
        self._batch_seconds[bucket] = seconds

    def runs_batch(self, bucket: int) -> bool:
        """Whether a lone batch of ``bucket`` runs on the loop."""
        last = self._batch_seconds.get(bucket, math.inf)
        return self.batches and last * 1000 < self.max_ms

    def describe(self) -> dict[str, float | bool]:
        return {"inline_max_ms": self.max_ms, "decode": bool(self.max_ms), "batch": self.batches}
