"""Serve: ``python -m app`` (configure with RESNET_SERVE_* environment variables)."""

from __future__ import annotations

import os
import signal
import sys

from pydantic import ValidationError

from app.edge.access import KeyFileError, key_files
from app.main import open_app
from app.process.server import Server, port_in_use, uvicorn_config
from app.process.workers import supervise
from app.repository.configs import runtime_config
from app.repository.sources import source
from app.runtimes.registry import check_model
from app.settings import Settings
from app.telemetry.logs import configure_logging
from app.telemetry.tracing import TracingError
from app.telemetry.tracing import check as check_tracing
from core.errors import ModelError


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
    try:
        check_tracing(settings)
    except TracingError as exc:
        print(f"resnet-serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.grpc_port and (problem := port_in_use(settings.host, settings.grpc_port)):
        where = f"{settings.host}:{settings.grpc_port}"
        print(
            f"resnet-serve: cannot listen on {where} (gRPC, grpc_port): {problem}", file=sys.stderr
        )
        return 1
    if settings.workers > 1:
        try:
            # Checked once, here, so that a bad model or key file is one line before any
            # worker starts; each worker then opens its own session.
            if settings.model_repository is None:
                check_model(runtime_config(settings))
            else:
                source(settings)
            key_files(settings)
        except (ModelError, KeyFileError) as exc:
            print(f"resnet-serve: {exc}", file=sys.stderr)
            return 1
        return supervise(settings, open_app)
    try:
        # Opened before uvicorn starts, so a bad model is one line and exit 1, not a traceback.
        app = open_app(settings)
    except (ModelError, KeyFileError) as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 1
    # uvicorn re-raises the stop signal once it has shut down; after a clean drain that must
    # not turn into death-by-signal (exit 143), so the re-raised signal is ignored here.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda sig, frame: None)
    server = Server(uvicorn_config(settings, app), app.state.service)
    server.run()
    return 0 if server.started else 1


def flush_or_discard() -> None:
    """Python exits 120 when it cannot flush stdout or stderr at the end (a full disk under the
    logs, a closed pipe): after a clean drain, what could not be written is dropped instead, so
    the exit status says how serving went."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


if __name__ == "__main__":
    status = main()
    flush_or_discard()
    sys.exit(status)
