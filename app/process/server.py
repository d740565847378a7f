"""The uvicorn server every process runs, alone (``python -m app``) or as one of the workers."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.process.drain import DrainingHttpToolsProtocol
from app.settings import Settings


def port_in_use(host: str, port: int) -> str | None:
    """Why ``port`` cannot be listened on (a plain bind fails while anyone listens there, even
    with SO_REUSEPORT); None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return str(exc)
    return None


def uvicorn_config(settings: Settings, app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, answering with "Connection: close" before it closes a connection on a stop
        http=DrainingHttpToolsProtocol,
        workers=1,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


class Server(uvicorn.Server):
    """Turns readiness to 503 the moment a stop signal arrives, before uvicorn starts draining;
    on SIGHUP re-reads the key files and loads what changed in the model repository;
    ``on_started`` runs once the server accepts connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._on_started = on_started
        self._reloading: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Only with keys or a repository to re-read: otherwise SIGHUP (a closed terminal) still
        # ends the server.
        if self._app.state.reloads_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload)
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    def _reload(self) -> None:
        for keys in self._app.state.key_files.values():
            keys.reload()
        models = getattr(self._app.state, "models", None)
        if models is not None:
            self._reloading = asyncio.get_running_loop().create_task(models.load_all())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle = getattr(self._app.state, "lifecycle", None)
        if lifecycle is not None:
            lifecycle.draining = True
        super().handle_exit(sig, frame)
