"""Which route a request is for, and the access it declares, before any routing.

Every route states its access in its decorator (``openapi_extra=access(INFERENCE)``, from
app.edge.access), and the door that runs before routing (app.http.middleware: the key check,
admission, the metrics label) reads it from the route the request matches, found once per
request by ``RouteTable``, through which every router is included in the app. A route that
declares nothing makes ``create_app`` fail, so a new route cannot skip the key check or
admission by being forgotten. The declaration shows in the OpenAPI document as ``x-access``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Scope

from app.edge.access import ACCESS_KEY, Access

# Distinct (method, path) pairs remembered; model names in paths are the caller's to invent.
CACHE_SIZE = 1024


@dataclass(frozen=True)
class Matched:
    label: str  # the route's path template (bounded metric labels), or "unmatched"
    access: Access
    exact: bool  # path and method both match (a wrong method is a 405, never admitted)


UNMATCHED = Matched("unmatched", Access.OPEN, exact=False)


class RouteTable:
    """The app's routes with their declared access, matched as Starlette's router would.

    Create it on the new app: FastAPI's own ``/openapi.json`` is open; then include every router
    and mount every file tree through it.
    """

    def __init__(self, app: FastAPI) -> None:
        self._routes: list[tuple[BaseRoute, Access]] = [
            (route, Access.OPEN) for route in app.routes if type(route) in (Route, Mount)
        ]
        self._cache: dict[tuple[str, str], Matched] = {}

    def mount(self, app: FastAPI, path: str, files: ASGIApp, name: str) -> None:
        """``app.mount``, open to all (the page's and the docs' static files)."""
        app.mount(path, files, name=name)
        self._routes.append((Mount(path, files, name=name), Access.OPEN))
        self._cache.clear()

    def include(self, app: FastAPI, router: APIRouter) -> None:
        """``app.include_router(router)``, its routes' access checked and remembered."""
        declared = [(route, _declared(route)) for route in router.routes]
        app.include_router(router)
        self._routes += declared
        self._cache.clear()

    def declared(self) -> list[tuple[str, frozenset[str], Access]]:
        """Every route's path template, methods and access (files' mounts: no methods)."""
        return [
            (_label(route), frozenset(getattr(route, "methods", None) or ()), kind)
            for route, kind in self._routes
        ]

    def match(self, scope: Scope) -> Matched:
        key = (scope["method"], scope["path"])
        found = self._cache.get(key)
        if found is None:
            found = self._match(scope)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _match(self, scope: Scope) -> Matched:
        partial = None
        for route, kind in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return Matched(_label(route), kind, exact=True)
            if match is Match.PARTIAL and partial is None:
                partial = Matched(_label(route), kind, exact=False)
        return partial or UNMATCHED


def _declared(route: BaseRoute) -> Access:
    if not isinstance(route, APIRoute):
        raise TypeError(f"{route!r}: only FastAPI routes declare their access")
    extra = route.openapi_extra or {}
    if ACCESS_KEY not in extra:
        raise ValueError(
            f"route {sorted(route.methods or ())} {route.path} declares no access: add "
            f"openapi_extra=access(Access.<KIND>) (one of {[kind.value for kind in Access]})"
        )
    return Access(extra[ACCESS_KEY])


def _label(route: BaseRoute) -> str:
    return str(getattr(route, "path", "unmatched"))
