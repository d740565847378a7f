"""Serve: ``python -m app`` (configure with RESNET_SERVE_* environment variables)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from app.keys import KeyFileError
from app.logs import configure_logging
from app.main import create_app, session_config
from app.session import OnnxModel
from app.settings import Settings
from core.errors import ModelError


class _Server(uvicorn.Server):
    """Turns readiness to 503 the moment a stop signal arrives, before uvicorn starts draining;
    re-reads the key files on SIGHUP."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Only with keys to re-read: otherwise SIGHUP (a closed terminal) still ends the server.
        if self._app.state.key_files:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_keys)
        await super().serve(sockets)

    def _reload_keys(self) -> None:
        for keys in self._app.state.key_files.values():
            keys.reload()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle = getattr(self._app.state, "lifecycle", None)
        if lifecycle is not None:
            lifecycle.draining = True
        super().handle_exit(sig, frame)


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        print(f"resnet-serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        # Opened before uvicorn starts, so a bad model is one line and exit 1, not a traceback.
        model = OnnxModel.load(session_config(settings))
    except ModelError as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings, model)
    except KeyFileError as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    # uvicorn re-raises the stop signal once it has shut down; after a clean drain that must
    # not turn into death-by-signal (exit 143), so the re-raised signal is ignored here.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda sig, frame: None)
    server = _Server(config, app)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
