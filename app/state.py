"""What lives on ``app.state``, and the ``Annotated`` aliases through which handlers reach it.

The getters are ``async def`` so FastAPI calls them inline instead of in its thread pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request

from app.batcher import Batcher
from app.errors import NotReady, Overloaded, ShuttingDown
from app.metrics import Metrics
from app.session import OnnxModel
from app.settings import Settings


class Lifecycle:
    """Readiness (warmed up, not draining) and admission of /predict work.

    Create it inside the running loop. ``draining`` is a plain flag so a signal handler may set it.
    """

    def __init__(self, max_inflight_requests: int) -> None:
        self.max_inflight_requests = max_inflight_requests
        self.predicting = 0
        self.warmed_batch_sizes: list[int] = []
        self.warmed = False
        self.draining = False
        self._warmed_event = asyncio.Event()

    def mark_warmed(self, batch_sizes: list[int]) -> None:
        self.warmed_batch_sizes = batch_sizes
        self.warmed = True
        self._warmed_event.set()

    async def wait_warmed(self) -> None:
        await self._warmed_event.wait()

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining

    def check_admitting(self) -> None:
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down and admits no new work",
                headers={"Retry-After": "1"},
            )
        if not self.warmed:
            raise NotReady("the model is still warming up", headers={"Retry-After": "1"})

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a /predict request in flight; bounds memory held by uploads being decoded."""
        self.check_admitting()
        if self.predicting >= self.max_inflight_requests:
            raise Overloaded(
                f"{self.predicting} requests in flight, the limit is "
                f"max_inflight_requests={self.max_inflight_requests}",
                headers={"Retry-After": "1"},
            )
        self.predicting += 1
        try:
            yield
        finally:
            self.predicting -= 1


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _model(request: Request) -> OnnxModel:
    model: OnnxModel = request.app.state.model
    return model


async def _batcher(request: Request) -> Batcher:
    batcher: Batcher = request.app.state.batcher
    return batcher


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


async def _decoder(request: Request) -> ThreadPoolExecutor:
    decoder: ThreadPoolExecutor = request.app.state.decoder
    return decoder


SettingsDep = Annotated[Settings, Depends(_settings)]
ModelDep = Annotated[OnnxModel, Depends(_model)]
BatcherDep = Annotated[Batcher, Depends(_batcher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]
DecoderDep = Annotated[ThreadPoolExecutor, Depends(_decoder)]
