"""Keep-alive connections of the server's own HTTP protocol (app.process.server), on a real uvicorn
on loopback: the idle timeout closes idle connections only, never one whose next request has come.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from app.process.server import DrainingHttpToolsProtocol, uvicorn_config
from app.settings import Settings

pytestmark = pytest.mark.anyio

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


class _Started(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


@contextlib.asynccontextmanager
async def serving(keep_alive_s: int) -> AsyncIterator[uvicorn.Server]:
    config = uvicorn.Config(
        hello,
        host="127.0.0.1",
        port=0,
        http=DrainingHttpToolsProtocol,
        lifespan="off",
        log_config=None,
        timeout_keep_alive=keep_alive_s,
    )
    server = _Started(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        await asyncio.wait_for(server.listening.wait(), 10)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def connected(server: uvicorn.Server) -> AsyncIterator[socket.socket]:
    """A raw client socket: what it sends is in the server's socket at once, with no loop turn."""
    address = server.servers[0].sockets[0].getsockname()
    with socket.socket() as client:
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, address)
        yield client


async def answer(client: socket.socket) -> bytes:
    """One whole answer ("ok", 2 bytes of body), or what came before the server closed."""
    received = b""
    loop = asyncio.get_running_loop()
    while not received.endswith(b"\r\n\r\nok"):
        chunk = await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
        if not chunk:
            break
        received += chunk
    return received


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_request_waiting_unread_when_the_timeout_fires_is_answered() -> None:
    async with serving(keep_alive_s=60) as server, connected(server) as client:
        client.send(REQUEST)
        assert (await answer(client)).startswith(b"HTTP/1.1 200")
        (connection,) = server.server_state.connections
        assert isinstance(connection, DrainingHttpToolsProtocol)
        # The next request is in the server's socket and the timer fires before the loop has
        # read it: nothing here yields to the loop in between.
        assert client.send(REQUEST) == len(REQUEST)
        deadline = time.monotonic() + 5
        while not connection._bytes_waiting():
            assert time.monotonic() < deadline, "the request never reached the server's socket"
        connection.timeout_keep_alive_handler()
        assert (await answer(client)).startswith(b"HTTP/1.1 200")


# uvloop, as the server runs: its closed transport's socket has no descriptor left (-1).
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})])
async def test_the_timer_firing_on_a_connection_already_closed_is_harmless() -> None:
    async with serving(keep_alive_s=60) as server, connected(server) as client:
        client.send(REQUEST)
        assert (await answer(client)).startswith(b"HTTP/1.1 200")
        (connection,) = server.server_state.connections
        assert isinstance(connection, DrainingHttpToolsProtocol)
        client.close()  # the client goes: the server's socket has no descriptor from here on
        await asyncio.sleep(0.1)
        assert not connection._bytes_waiting()  # was: ValueError from ioctl on -1
        connection.timeout_keep_alive_handler()


async def test_an_idle_connection_is_closed_after_the_timeout() -> None:
    async with serving(keep_alive_s=1) as server, connected(server) as client:
        client.send(REQUEST)
        assert (await answer(client)).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(client, 4096), 5) == b""  # the server's FIN
        assert time.monotonic() - began >= 0.9


def test_the_server_keeps_idle_connections_longer_than_client_pools_do(tmp_path: Path) -> None:
    # httpx's pool reuses a connection idle up to 5 s, aiohttp's up to 15 s: a server closing
    # first races their next request.
    settings = Settings(model_path=tmp_path / "model.onnx")
    assert uvicorn_config(settings, FastAPI()).timeout_keep_alive > 15
    changed = Settings(model_path=tmp_path / "model.onnx", keep_alive_timeout_s=2)
    assert uvicorn_config(changed, FastAPI()).timeout_keep_alive == 2
