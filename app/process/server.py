"""The uvicorn server every process runs, alone (``python -m app``) or as one of the workers, and
its HTTP/1.1 connections, drained without a client-side error.

Draining: uvicorn's HTTP protocol, changed in how it stops (``shutdown``, which uvicorn calls on
every connection once the stop signal came).

uvicorn closes a connection that is idle at that moment at once. A keep-alive client may be writing
its next request on it just then; the request meets a closed socket, and the client gets a read
error: it cannot know whether the request was computed, so it cannot safely retry. Envoy and nginx
avoid that by answering with ``Connection: close`` before they close. Here:

- a connection answering a request keeps it, and the answer carries ``Connection: close``;
- an idle connection is kept for ``IDLE_GRACE_S``: a request that arrives is answered (the server
  is draining, so an inference request gets 503 ``shutting_down`` with ``Retry-After``) with
  ``Connection: close``; one that is still idle after it is closed then. A client that sends its
  next request within the grace window (a closed-loop client does, in milliseconds) always gets an
  answer; one idle for longer finds the connection closed before it writes, which it sees as a
  closed keep-alive connection and reopens, as after any keep-alive timeout.

And every close the server starts lingers, as nginx's ``lingering_close``: an answer can go out
before the client has sent all of its request (a 503 from the door, before the body is read); a
socket closed with the rest of that body still arriving makes the kernel send a reset, which can
destroy the answer before the client reads it. So the server sends its FIN after the answer, reads
and drops what still comes for up to ``LINGER_S``, and closes when the client does.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import signal
import socket
import termios
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )


class Served(Protocol):
    """What the server asks of the service it runs (app.service.Service)."""

    @property
    def reloads_on_sighup(self) -> bool: ...

    def reload(self) -> None: ...

    def stop_admitting(self) -> None: ...


class Server(uvicorn.Server):
    """Turns readiness to 503 the moment a stop signal arrives, before uvicorn starts draining;
    on SIGHUP re-reads the key files and loads what changed in the model repository;
    ``on_started`` runs once the server accepts connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        served: Served,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._served = served
        self._on_started = on_started

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Only with keys or a repository to re-read: otherwise SIGHUP (a closed terminal) still
        # ends the server.
        if self._served.reloads_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._served.reload)
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._served.stop_admitting()
        super().handle_exit(sig, frame)


# Long enough for a keep-alive client to send its next request and get its answer with
# "Connection: close"; short against shutdown_timeout_s (default 30 s), which bounds it.
IDLE_GRACE_S = 1.0
# How long a closing connection reads and drops what its client still sends.
LINGER_S = 1.0


class _Lingering:
    """A transport whose ``close`` half-closes first (see the module's docstring)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # after what is buffered: the answer goes out first
        self._loop.call_later(LINGER_S, self._transport.close)


class DrainingHttpToolsProtocol(HttpToolsProtocol):
    _draining = False
    _receiving = False  # a request's first bytes came, its headers are not complete yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _Lingering(transport, self.loop)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if isinstance(self.transport, _Lingering) and self.transport.lingering:
            return  # the rest of a request already answered: dropped
        super().data_received(data)

    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._unset_keepalive_if_required()
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving = True

    def on_headers_complete(self) -> None:
        self._receiving = False
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._draining:  # no keep-alive timer while draining: the grace timer closes it
            self._unset_keepalive_if_required()

    def timeout_keep_alive_handler(self) -> None:
        # uvicorn closes the connection as it stands, and a request whose bytes have just come in
        # was lost: the client saw "disconnected without sending a response" (a CI run of
        # test_robustness_load). Read, it is answered, and its answer arms the timer again.
        if self._receiving or self._bytes_waiting():
            return
        super().timeout_keep_alive_handler()

    def _close_if_idle(self) -> None:
        if self.transport.is_closing():
            return
        if self._receiving or self._bytes_waiting():  # a request is arriving: answer it first
            self.loop.call_later(0.05, self._close_if_idle)
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        # else a request came in the window: its answer says Connection: close and closes it

    def _bytes_waiting(self) -> bool:
        """Whether a request's first bytes sit in the socket, not yet read by the loop: a keep-alive
        client sends its next request as soon as it has an answer, and closing then would lose it
        (the client sees the connection end with its request sent: seen once in a CI run)."""
        sock = self.transport.get_extra_info("socket")
        # A connection the client closed as the timer fired has no descriptor left (-1): seen
        # once under 16 keep-alive clients (benchmarks/rollout.py), as a ValueError from ioctl.
        if sock is None or sock.fileno() < 0:
            return False
        waiting = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
        except OSError:
            return False
        return waiting[0] > 0
