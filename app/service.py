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
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

from app.batching.admission import Admission, Lifecycle
from app.batching.fair import FairExecutor
from app.edge.access import KeyFile
from app.edge.fetch import Fetcher, UrlPolicy
from app.edge.limits import Limiter
from app.edge.requests import RequestLog, caller
from app.errors import NotReady, RolloutNotFound, UnknownModel
from app.pipeline.cache import AnswerCache
from app.pipeline.pipeline import UploadLimits
from app.repository.configs import admission_config
from app.repository.link import TALLY_INTERVAL_S, Change, Outcome, WorkerLink, raise_refusal
from app.repository.models import Models
from app.repository.policy import check_version
from app.repository.requests import RolloutRequest
from app.repository.rollout import Status
from app.repository.route import Rollout, Route
from app.repository.sources import source
from app.repository.version import Opener
from app.runtimes.base import Backend
from app.settings import Settings
from app.store.redis import SharedRedis
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing
from core.errors import BadRequest

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
        self.url_policy = UrlPolicy.parse(
            settings.url_allow,
            max_bytes=settings.max_image_bytes,
            timeout_ms=settings.url_timeout_ms,
            max_redirects=settings.url_max_redirects,
            concurrency=settings.url_fetch_concurrency,
        )
        self.fetcher: Fetcher
        self.redis = (
            SharedRedis(settings.redis_url, settings.redis_timeout_ms, metrics)
            if settings.redis_url
            else None
        )
        self.rate_limits = Limiter(metrics, self.redis, settings.rate_limit_delay_ms)
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
        self.fetcher = Fetcher(self.url_policy)
        opened, self._opened = self._opened, None
        cache = (
            AnswerCache(settings.cache_bytes, metrics, self.redis, settings.redis_cache_ttl_s)
            if settings.cache_bytes
            else None
        )
        opener = Opener(
            settings,
            self._cores,
            self.admission,
            decoder,
            metrics,
            lifecycle,
            self.tracing,
            opened,
            cache,
        )
        self.models = Models(source(settings), opener.open, metrics, settings.default_model)
        warming = asyncio.create_task(self._first_load())
        watching = self._start(self._watch()) if settings.repository_poll_s else None
        sampler = self._start(metrics.sample_forever()) if metrics.multiprocess else None
        if self.link is not None:
            self.models.judged = False  # the supervisor judges every worker's figures
            self._start(self._report_forever())
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
            await self.fetcher.close()
            if self.redis is not None:
                await self.redis.close()
            decoder.shutdown(wait=True)
            opener.close()
            if sampler is not None:
                metrics.sample()
            self.tracing.shutdown()  # what was traced is sent before the process goes
            log.info("drained")

    def route(self, name: str | None = None, version: str | None = None) -> Route:
        """Where the current request goes (app.repository.route): its caller is known here."""
        return self.models.route(name, version, caller.get().identity)

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

    async def start_rollout(self, name: str, asked: RolloutRequest) -> dict[str, object]:
        """A rollout of ``name``'s ``asked.candidate`` against the version serving, on every
        worker; its state."""
        served = self.models.resolve(name)
        candidate = str(check_version(asked.candidate))
        if candidate == served.version:
            raise BadRequest(f"version {candidate} of {name!r} already serves: pick another")
        share = self.settings.rollout_compare_share
        plan = asked.plan(os.urandom(8).hex(), served.name, served.version, candidate, share)
        raise_refusal(await self.change_repository(Change("rollout", name, plan=plan)))
        return await self.rollout_state(name)

    async def end_rollout(self, name: str, status: Status) -> dict[str, object]:
        """The running rollout of ``name`` promoted or stopped, on every worker; its state."""
        plan = self.models.rollout(name)
        raise_refusal(await self.change_repository(Change(status.value, name, plan=plan)))
        self.metrics.rollout_ends.labels(name, status.value).inc()
        return await self.rollout_state(name)

    async def rollout_state(self, name: str) -> dict[str, object]:
        """The state of ``name``'s last rollout, the whole server's figures."""
        if self.link is None:
            return self.models.rollout_state(name)
        self._report_rollouts()
        state = await self.link.ask("rollout", name)
        if state is None:
            raise RolloutNotFound(f"model {name!r} has had no rollout since the server started")
        return cast(dict[str, object], state)

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

    def _report_rollouts(self) -> None:
        """What this worker saw of each running rollout, sent to the supervisor that judges."""
        assert self.link is not None
        for name, rollout in list(self.models.rollouts.items()):
            if isinstance(rollout, Rollout) and rollout.pending:
                self.link.send(("tally", None, (name, rollout.plan.ident, rollout.take())))

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(TALLY_INTERVAL_S)
            self._report_rollouts()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.models.load_all(polled=True)
            except Exception:  # the next look may succeed: a poll never stops for good
                log.exception("polling the model repository failed")
