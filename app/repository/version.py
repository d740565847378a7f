"""A model version, a unit: its session(s), lanes, batcher, buckets, warm-up, batch limit,
cost estimate and pipeline (docs/repository.md); and how this worker opens one (``Opener``).

A version is opened and warmed beside those already serving and takes requests only once it is
ready (app.repository.models swaps it in); taken out, it finishes what it admitted before its
session is let go. Process-wide limits (buffered bytes, the door, decode threads) are not its own.
Its session is opened on a thread of lower CPU priority, so the versions serving keep the cores.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from app.batching.admission import Admission, CostEstimate, Lifecycle
from app.batching.batcher import Batcher
from app.batching.warmup import warm_up
from app.pipeline.cache import AnswerCache
from app.pipeline.pipeline import Pipeline
from app.process.memory import check_budget
from app.repository.configs import batch_config, pipeline_config, runtime_config
from app.runtimes.base import Backend
from app.runtimes.config import RuntimeConfig
from app.runtimes.registry import open_model, peak_copies
from app.settings import Settings
from app.telemetry.metrics import Metrics, VersionMetrics
from app.telemetry.tracing import Tracing
from core.contract import ModelMetadata
from core.errors import ModelError

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
    pipeline: Pipeline
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


# The loading thread's niceness: opening a version (graph optimisation, the bulk of a load) gives
# way to the versions serving, so they keep the cores while a new one is prepared.
LOAD_NICENESS = 10


class Opener:
    """Opens versions for one worker; every version shares its admission, decoders and metrics.

    ``opened``: ``model_path`` already opened (``python -m app`` opens it first to fail fast),
    used for the first version. Create inside the running loop; ``close`` when done.
    """

    def __init__(
        self,
        settings: Settings,
        cores: int | None,
        admission: Admission,
        decoder: Executor,
        metrics: Metrics,
        lifecycle: Lifecycle,
        tracing: Tracing,
        opened: Backend | None = None,
        cache: AnswerCache | None = None,
    ) -> None:
        self.settings = settings
        self.cores = cores
        self.admission = admission
        self.decoder = decoder
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.tracing = tracing
        self._opened = opened
        self.cache = cache
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=_yield_cpu)

    async def open(self, name: str, version: str, path: Path) -> ServedModel:
        """Opened, warmed and checked; raises (ModelError, or the runtime's) when it cannot
        serve."""
        loaded, self._opened = self._opened, None
        if loaded is None:
            config = replace(runtime_config(self.settings, self.cores), model_path=path)
            budget = self.settings.memory_budget_mib
            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(self._loader, _open_within, config, budget)
        if self.settings.model_repository is not None and loaded.metadata.name != name:
            raise ModelError(
                f"{path} holds the model {loaded.metadata.name!r} (its metadata), not "
                f"{name!r} (its folder): rename the folder, or export it under that name"
            )
        # The cache keys answers by the file's bytes, not its path: replicas share them (Redis).
        digest = None
        if self.cache is not None:
            loop = asyncio.get_running_loop()
            digest = await loop.run_in_executor(self._loader, _file_digest, path)
        served = self._serve(name, version, path, loaded, digest)
        await served.start()
        return served

    def close(self) -> None:
        self._loader.shutdown(wait=True)

    def _serve(
        self, name: str, version: str, path: Path, loaded: Backend, digest: str | None = None
    ) -> ServedModel:
        estimate = CostEstimate()
        metrics = self.metrics.for_version(name, version)
        admission = self.admission
        batcher = Batcher(
            loaded.run,
            batch_config(self.settings, loaded.provider, self.cores),
            metrics,
            on_failure=self.lifecycle.fail,
            on_stuck=self.lifecycle.lane_stuck,
            on_batch=estimate.observe_batch,
            alone_fn=loaded.run_alone if loaded.adaptive else None,
            admitted_images=lambda: admission.admitted_images,
            tracing=self.tracing,
            described={
                "resnet_serve.model": name,
                "resnet_serve.model_version": version,
                "resnet_serve.provider": loaded.provider,
                "resnet_serve.precision": loaded.precision,
                "resnet_serve.backend": loaded.backend,
            },
        )
        pipeline = Pipeline(
            loaded,
            batcher,
            self.decoder,
            admission,
            self.metrics,
            pipeline_config(self.settings),
            estimate,
            self.tracing,
            self.cache,
            (name, version, loaded.precision, loaded.backend, digest or str(path)),
        )
        return ServedModel(
            name, version, path, loaded, batcher, pipeline, estimate, admission, metrics
        )


def _file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()


def _yield_cpu() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)


def _open_within(config: RuntimeConfig, budget_mib: int) -> Backend:
    """``open_model``, refused first where it would go over the memory budget (and a second
    runtime for some batch sizes opened only where it fits then)."""
    size = config.model_path.stat().st_size if config.model_path.is_file() else 0
    check_budget(budget_mib, size, peak_copies(config), str(config.model_path))
    return open_model(config, budget_mib)
