"""Debian's ``redis-server`` as a real process on 127.0.0.1, started and stopped by the test."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.server import free_port

START_TIMEOUT_S = 20.0
# Redis's units: 1k is 1000 bytes, 1kb 1024.
MEMORY_UNITS = {"k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    # A config file (docker/redis.conf) and options after it, instead of no persistence alone.
    config: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            reason = "needs Debian's redis-server (apt-get install redis-server)"
            if os.environ.get("CI"):
                pytest.fail(reason)  # .ci/run installs it: missing there is a broken CI script
            pytest.skip(reason)
        # No persistence (the config file's, or these options): each start is an empty Redis, as
        # after a crash with no disk. On loopback, whatever a config file binds.
        arguments = [*self.config] or ["--save", "", "--appendonly", "no"]
        arguments += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        self.process = subprocess.Popen([binary, *arguments], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def redis_server(directory: Path, config: tuple[str, ...] = ()) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), directory, config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def memory_bytes(value: str) -> int:
    """A memory size as Redis's config reads it ("256mb")."""
    match = re.fullmatch(r"(\d+)([kmg]b?)?", value.lower())
    if match is None:
        raise ValueError(f"not a Redis memory size: {value!r}")
    number, unit = match.groups()
    return int(number) * (MEMORY_UNITS[unit] if unit else 1)
