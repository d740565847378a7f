"""One served model version, a unit: its session(s), lanes, batcher, buckets, warm-up, batch limit,
cost estimate and classifier (docs/repository.md).

A version is opened and warmed beside those already serving and takes requests only once it is
ready (app.engine.models swaps it in); taken out, it finishes what it admitted before its session
is let go. Process-wide limits (buffered bytes, the door, decode threads) are not its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from app.engine.admission import Admission, CostEstimate
from app.engine.backend import Backend
from app.engine.batcher import Batcher
from app.engine.classifier import Classifier
from app.engine.warmup import warm_up
from app.process.metrics import VersionMetrics
from core.contract import ModelMetadata

log = logging.getLogger(__name__)


class State(StrEnum):
    # The Open Inference Protocol's repository index states (Triton's).
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False)
class ServedModel:
    name: str  # the model's name in URLs and answers
    version: str  # its version: the repository folder's number, or the metadata's version
    source: Path  # the ONNX file it was opened from
    model: Backend
    batcher: Batcher
    classifier: Classifier
    estimate: CostEstimate
    admission: Admission
    metrics: VersionMetrics
    state: State = State.LOADING
    batch_seconds: dict[int, float] = field(default_factory=dict)  # warm-up's timings
    _holds: int = 0  # requests that resolved this version and have not been answered
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @contextmanager
    def hold(self) -> Iterator[ServedModel]:
        """Around a request's whole handling, from the moment it resolved this version: taken
        out meanwhile, the version still finishes it (``stop`` waits)."""
        self._holds += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._holds -= 1
            if not self._holds:
                self._idle.set()

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    @property
    def provider(self) -> str:
        return self.model.provider

    async def start(self) -> None:
        """Warm and check it, then count it in admission; raises (and stays unavailable) on any
        failure."""
        self.model.bind(self.batcher.config.buckets)
        self.batcher.start()
        try:
            self.batch_seconds = await warm_up(self.model, self.batcher, self.estimate)
        except BaseException:
            self.state = State.UNAVAILABLE
            await self.batcher.drain()
            self.metrics.remove()
            raise
        self.admission.estimates.add(self.estimate)
        self.metrics.describe(
            {
                "provider": self.provider,
                "backend": self.model.backend,
                "precision": self.model.precision,
                "build": self.metadata.version,
            }
        )
        self.state = State.READY
        log.info(
            "ready",
            extra={
                "model": self.name,
                "version": self.version,
                "provider": self.provider,
                "backend": self.model.describe(),
                "batch_limit": self.batcher.limit,
                "batch_ms": {size: round(s * 1000, 1) for size, s in self.batch_seconds.items()},
                "inline": self.batcher.inline.describe(),
            },
        )

    async def stop(self) -> None:
        """Finish every request that reached it, then stop its lanes (its session goes with
        it). Call once no new request can resolve it."""
        self.state = State.UNLOADING
        if self._holds:
            await self._idle.wait()
        await self.batcher.drain()
        self.admission.estimates.discard(self.estimate)
        self.metrics.remove()
        self.state = State.UNAVAILABLE
        log.info("unloaded", extra={"model": self.name, "version": self.version})
