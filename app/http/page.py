"""The web page at ``/``: plain HTML, one script and one stylesheet from ``app/http/static``.

No build step and nothing from a CDN, so the page works on an offline host.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.edge.access import Access, access
from app.http.routing import RouteTable

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/", openapi_extra=access(Access.OPEN))
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def install_page(app: FastAPI, routes: RouteTable) -> None:
    routes.include(app, router)
    routes.mount(app, "/static", StaticFiles(directory=STATIC_DIR), "static")
