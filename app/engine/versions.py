"""How this worker opens a model version: its session (in a thread of lower CPU priority), its
lanes, batcher and classifier, warmed and checked, ready to serve (app.engine.models calls it)."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from app.engine.admission import Admission, CostEstimate
from app.engine.backend import Backend
from app.engine.backends import open_model, peak_copies
from app.engine.batcher import Batcher
from app.engine.classifier import Classifier, ClassifyConfig
from app.engine.lifecycle import Lifecycle
from app.engine.memory import check_budget
from app.engine.served import ServedModel
from app.engine.session import SessionConfig
from app.engine.sizing import batch_config, session_config
from app.process.metrics import Metrics
from app.process.tracing import Tracing
from app.settings import Settings
from core.errors import ModelError

# The loading thread's niceness: opening a version (graph optimisation, the bulk of a load) gives
# way to the versions serving, so they keep the cores while a new one is prepared.
LOAD_NICENESS = 10


def classify_config(settings: Settings) -> ClassifyConfig:
    return ClassifyConfig(
        default_top_k=settings.default_top_k,
        limits=settings.limits,
        max_request_pixels=settings.max_request_pixels,
        request_timeout_ms=settings.request_timeout_ms,
    )


class Versions:
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
    ) -> None:
        self.settings = settings
        self.cores = cores
        self.admission = admission
        self.decoder = decoder
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.tracing = tracing
        self._opened = opened
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=_yield_cpu)

    async def open(self, name: str, version: str, path: Path) -> ServedModel:
        """Opened, warmed and checked; raises (ModelError, or the runtime's) when it cannot
        serve."""
        loaded, self._opened = self._opened, None
        if loaded is None:
            config = replace(session_config(self.settings, self.cores), model_path=path)
            budget = self.settings.memory_budget_mib
            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(self._loader, _open_within, config, budget)
        if self.settings.model_repository is not None and loaded.metadata.name != name:
            raise ModelError(
                f"{path} holds the model {loaded.metadata.name!r} (its metadata), not "
                f"{name!r} (its folder): rename the folder, or export it under that name"
            )
        served = self._serve(name, version, path, loaded)
        await served.start()
        return served

    def close(self) -> None:
        self._loader.shutdown(wait=True)

    def _serve(self, name: str, version: str, path: Path, loaded: Backend) -> ServedModel:
        estimate = CostEstimate()
        metrics = self.metrics.for_version(name, version)
        admission = self.admission
        batcher = Batcher(
            loaded.predict,
            batch_config(self.settings, loaded.provider, self.cores),
            metrics,
            on_failure=self.lifecycle.fail,
            on_stuck=self.lifecycle.lane_stuck,
            on_batch=estimate.observe_batch,
            alone_fn=loaded.predict_alone if loaded.adaptive else None,
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
        classifier = Classifier(
            loaded,
            batcher,
            self.decoder,
            admission,
            self.metrics,
            classify_config(self.settings),
            estimate,
            self.tracing,
        )
        return ServedModel(
            name, version, path, loaded, batcher, classifier, estimate, admission, metrics
        )


def _yield_cpu() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)


def _open_within(config: SessionConfig, budget_mib: int) -> Backend:
    """``open_model``, refused first where it would go over the memory budget."""
    size = config.model_path.stat().st_size if config.model_path.is_file() else 0
    check_budget(budget_mib, size, peak_copies(config), str(config.model_path))
    return open_model(config)
