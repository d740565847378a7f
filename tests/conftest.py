"""Fixtures for the app tests: small real ONNX models that honour the export contract, images,
and a local site to fetch images from by URL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.runtimes.onnxruntime import OnnxModel
from app.settings import Settings
from tests.helpers.image_site import image_site
from tests.helpers.models import build_model, build_slow_model
from tests.helpers.server import Server, message_is, run_server
from tests.helpers.training import (  # noqa: F401  (fixtures)
    color_eval_folder,
    color_folder,
    tiny_checkpoint,
)


@pytest.fixture(scope="session", autouse=True)
def tuning_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``auto``'s timings kept for the session, away from the user's own tuning cache (servers
    from tests.helpers.server get the same directory)."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("tuning")
        patch.setenv("RESNET_SERVE_TUNING_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[Server]:
    """``python -m app`` on the tiny model, ready, shared by one test module."""
    with run_server(model_path) as running:
        running.wait_for_log(message_is("ready"))
        yield running


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    """The local image site's base URL (tests.helpers.image_site), for images by URL."""
    with image_site() as url:
        yield url


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_slow_model(tmp_path_factory.mktemp("slow") / "slow.onnx")


@pytest.fixture
def make_settings(model_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_path": model_path,
            "max_batch_size": 4,
            "max_wait_ms": 2.0,
            "decode_threads": 2,
            "concurrent_batches": 2,  # as on two cores, whatever the machine
            "intra_op_threads": 1,
            "flat_batch_ms": 1e9,  # batches up to max_batch_size, whatever the timings fit
            "grpc_port": 0,  # many apps in one process: gRPC only where a test asks for it
        }
        if "model_repository" in overrides:  # a repository replaces model_path
            del values["model_path"]
        return Settings(**(values | overrides))

    return make


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Serve = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def running(
    make_settings: Callable[..., Settings], model: OnnxModel | None = None, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app built from ``make_settings(**overrides)``, its lifespan run until warm, and a
    client to it."""
    app = create_app(make_settings(**overrides), model)
    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


@pytest.fixture
def serve(make_settings: Callable[..., Settings]) -> Serve:
    """``async with serve(**settings) as client``: the app's lifespan runs and warm-up completes."""

    @asynccontextmanager
    async def run(
        model: OnnxModel | None = None, **overrides: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        async with running(make_settings, model, **overrides) as (_, client):
            yield client

    return run
