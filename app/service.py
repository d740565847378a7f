"""The service every transport serves from: the model versions, admission, readiness, metrics,
tracing, keys and the access log of one worker, as one explicit object.

HTTP (app.http), the Open Inference Protocol over REST (app.oip.rest) and gRPC (app.grpc) are
adapters over it: none reaches into another's state. ``running()`` is the worker's life: the
models opened and warmed, the repository watched, and, at the end, everything drained and
closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from app.batching.admission import Admission, Lifecycle
from app.batching.fair import FairExecutor
from app.edge.access import KeyFile
from app.edge.requests import RequestLog
from app.errors import NotReady, UnknownModel
from app.pipeline.pipeline import UploadLimits
from app.repository.configs import admission_config
from app.repository.link import Change, Outcome, WorkerLink
from app.repository.models import Models
from app.repository.sources import source
from app.repository.version import Opener
from app.runtimes.base import Backend
from app.settings import Settings
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

NAME, VERSION = "resnet-serve", "0.1.0"


class Service:
    """One worker's service. The parts that belong to the event loop (readiness, admission, the
    models) exist from ``running()`` on; ``link`` is set by a worker's supervisor before that."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        tracing: Tracing,
        key_files: dict[str, KeyFile],
        opened: Backend | None = None,
        cores: int | None = None,
    ) -> None:
        """``opened``: ``model_path`` already opened (``python -m app`` opens it first to fail
        fast). ``cores``: this worker's own cores when it is pinned to them."""
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.key_files = key_files
        self.request_log = RequestLog(metrics)
        self.limits = UploadLimits(
            max_image_bytes=settings.max_image_bytes,
            max_images_per_request=settings.max_images_per_request,
        )
        self.default_top_k = settings.default_top_k
        self.link: WorkerLink | None = None
        self.lifecycle: Lifecycle
        self.admission: Admission
        self.models: Models
        self._opened = opened
        self._cores = cores
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def reloads_on_sighup(self) -> bool:
        """Whether SIGHUP re-reads something (keys, the repository) rather than stopping us."""
        return bool(self.key_files) or self.settings.model_repository is not None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serving from here to the end of the block; drained and closed after it."""
        settings, metrics = self.settings, self.metrics
        self.lifecycle = lifecycle = Lifecycle(settings.retry_after_s)
        self.admission = Admission(admission_config(settings), lifecycle, metrics)
        decoder = FairExecutor(settings.decode_threads, "decode")
        opened, self._opened = self._opened, None
        opener = Opener(
            settings, self._cores, self.admission, decoder, metrics, lifecycle, self.tracing, opened
        )
        self.models = Models(source(settings), opener.open, metrics, settings.default_model)
        warming = asyncio.create_task(self._first_load())
        watching = self._start(self._watch()) if settings.repository_poll_s else None
        sampler = self._start(metrics.sample_forever()) if metrics.multiprocess else None
        try:
            if settings.workers > 1:
                # uvicorn listens only once the lifespan has started: until this worker is
                # warm, the kernel gives the port's connections to the other workers.
                await warming
                if not lifecycle.warmed:
                    raise RuntimeError("no model is ready; this worker will not serve")
            yield
        finally:
            lifecycle.draining = True
            for task in (watching, sampler):
                if task is not None:
                    task.cancel()
            await asyncio.gather(warming, return_exceptions=True)
            await self.models.close()
            decoder.shutdown(wait=True)
            opener.close()
            if sampler is not None:
                metrics.sample()
            self.tracing.shutdown()  # what was traced is sent before the process goes
            log.info("drained")

    def check_ready(self) -> None:
        """Warm, not draining, no lane stuck, and a version ready: of the default model, or of
        any model when there is none (several served, and each request names one)."""
        self.lifecycle.check_ready()
        default = self.models.default_name
        try:
            if default is not None:
                self.models.resolve(default)
            elif not self.models.ready():
                raise UnknownModel("no model version is ready")
        except UnknownModel as exc:
            raise NotReady(exc.message, headers=self.lifecycle.retry_after) from None

    async def change_repository(self, change: Change) -> list[Outcome]:
        """A repository change applied here, or by every worker (app.repository.link): each
        one's outcome."""
        if self.link is None:
            return [Outcome(None, failed=await self.models.apply(change))]
        return await self.link.relay(change)

    def stop_admitting(self) -> None:
        """A stop signal came: readiness turns 503 now, before the server starts draining."""
        lifecycle = getattr(self, "lifecycle", None)
        if lifecycle is not None:
            lifecycle.draining = True

    def reload(self) -> None:
        """SIGHUP: the key files re-read, and the repository's changes loaded."""
        for keys in self.key_files.values():
            keys.reload()
        if hasattr(self, "models"):
            self._start(self.models.load_all())

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)
        return task

    async def _first_load(self) -> None:
        """Every model to its policy, then (a worker) the repository changes the other workers
        applied; ready once a model is (each failure is logged and indexed)."""
        models = self.models
        await models.load_all()
        if self.link is not None:
            await self.link.attach(models.apply)
        if models.ready():
            self.lifecycle.mark_warmed()
        else:
            log.error("no model version is ready; the server stays unready")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.models.load_all(polled=True)
            except Exception:  # the next look may succeed: a poll never stops for good
                log.exception("polling the model repository failed")
