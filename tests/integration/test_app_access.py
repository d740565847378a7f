"""Every route declares its access (app.http.routing), and the door enforces each declaration."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from app.edge.access import Access
from app.http.routing import RouteTable
from app.main import create_app
from tests.conftest import Serve
from tests.helpers.models import image_bytes

PNG = image_bytes(3)
pytestmark = pytest.mark.anyio


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template)


def declared(app: FastAPI, *kinds: Access) -> list[tuple[str, str]]:
    table: RouteTable = app.state.routes
    return sorted(
        (method, concrete(path))
        for path, methods, kind in table.declared()
        if kind in kinds
        for method in methods - {"HEAD"}
    )


def test_a_route_that_declares_no_access_stops_the_app_from_being_built() -> None:
    router = APIRouter()

    @router.post("/forgotten")
    async def forgotten() -> None:
        """Declares nothing."""

    with pytest.raises(ValueError, match=r"route \['POST'\] /forgotten declares no access"):
        RouteTable(FastAPI()).include(FastAPI(), router)


def test_the_declarations_are_what_the_service_promises(make_settings: Any) -> None:
    app = create_app(make_settings())
    assert declared(app, Access.INFERENCE) == [
        ("POST", "/embed"),
        ("POST", "/explain"),
        ("POST", "/predict"),
        ("POST", "/v2/models/x/infer"),
        ("POST", "/v2/models/x/versions/x/infer"),
    ]
    assert declared(app, Access.METRICS) == [("GET", "/metrics")]
    # Every POST or PUT is inference or the repository's control: nothing else takes a body.
    assert {path for method, path in declared(app, *Access) if method in ("POST", "PUT")} == {
        path
        for method, path in declared(app, Access.INFERENCE, Access.REPOSITORY)
        if method in ("POST", "PUT")
    }
    assert declared(app, Access.REPOSITORY) == [
        ("DELETE", "/v2/repository/models/x/rollout"),
        ("GET", "/v2/repository/models/x/rollout"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/x/load"),
        ("POST", "/v2/repository/models/x/rollout/promote"),
        ("POST", "/v2/repository/models/x/unload"),
        ("PUT", "/v2/repository/models/x/rollout"),
    ]
    operations = app.openapi()["paths"]["/predict"]["post"]
    assert operations["x-access"] == "inference"


async def test_every_inference_route_is_admitted_before_its_body_is_read(
    make_settings: Any,
) -> None:
    app = create_app(make_settings())
    bodies_read = 0

    async def counting() -> AsyncIterator[bytes]:
        nonlocal bodies_read
        bodies_read += 1
        yield PNG

    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        app.state.service.lifecycle.draining = True  # the door admits nothing now
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for method, path in declared(app, Access.INFERENCE):
                refused = await client.request(
                    method, path, content=counting(), headers={"content-type": "image/png"}
                )
                assert refused.status_code == 503, path
                assert refused.headers["retry-after"] == "1", path
    assert bodies_read == 0


async def test_every_guarded_route_refuses_a_missing_key_and_open_ones_do_not(
    make_settings: Any, tmp_path: Path
) -> None:
    (tmp_path / "api").write_text("the-api-key\n")
    (tmp_path / "metrics").write_text("the-metrics-key\n")
    app = create_app(
        make_settings(api_keys_file=tmp_path / "api", metrics_api_keys_file=tmp_path / "metrics")
    )
    async with app.router.lifespan_context(app):
        await app.state.service.lifecycle.wait_warmed()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for method, path in declared(app, Access.API, Access.INFERENCE, Access.METRICS):
                refused = await client.request(method, path)
                assert refused.status_code == 401, (method, path)
                assert "www-authenticate" in refused.headers
            for method, path in declared(app, Access.OPEN, Access.PROBE):
                assert (await client.request(method, path)).status_code != 401, path


async def test_probes_are_logged_at_debug_and_other_requests_at_info(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve() as client:
        with caplog.at_level(logging.INFO, logger="app.access"):
            for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2"):
                assert (await client.get(path)).status_code == 200
        with caplog.at_level(logging.DEBUG, logger="app.access"):
            await client.get("/readyz")
    logged = [(r.levelno, r.path) for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert logged == [(logging.INFO, "/v2"), (logging.DEBUG, "/readyz")]
