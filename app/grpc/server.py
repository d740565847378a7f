"""The gRPC server (grpc.aio) beside uvicorn, on the app's event loop: started by the app's
lifespan (in a worker, once it is warm, as its HTTP socket is) and stopped with it, after HTTP
has drained: new calls are refused UNAVAILABLE from the moment the server drains, and calls in
flight are given ``shutdown_timeout_s`` to finish."""

from __future__ import annotations

import logging

import grpc

from app.grpc.service import InferenceService
from app.service import Service
from app.settings import Settings

log = logging.getLogger(__name__)


async def start(service: Service, settings: Settings) -> grpc.aio.Server:
    """Listening on ``host:grpc_port``. With several workers each listens on the port
    (SO_REUSEPORT, as for HTTP: app.process.workers checked it is free); alone, it is bound
    exclusively, so a port in use is an error instead of a silently shared one."""
    options = [
        # A message is as large as a request body may be; answers are small.
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]
    server = grpc.aio.server(options=options)
    inference = InferenceService(service)
    server.add_generic_rpc_handlers((inference.handlers(), inference.health()))
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{address}:{settings.grpc_port}")
    await server.start()
    log.info("gRPC listening", extra={"host": settings.host, "port": port})
    return server


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    await server.stop(grace_s)
