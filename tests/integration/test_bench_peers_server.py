"""The peer benchmark against a real ``python -m app``: it reads what the server chose to run
(tests/unit/test_bench_peers.py: its own logic)."""

from __future__ import annotations

import asyncio

import httpx

from benchmarks.peers.drive import served_by
from tests.helpers.server import Server


def test_served_by_reads_what_a_running_server_chose(server: Server) -> None:
    chosen = httpx.get(f"{server.url}/v1/models").json()["models"][0]
    (entry,) = [c for c in chosen["backend"]["candidates"] if c["chosen"]]
    text = asyncio.run(served_by(f"{server.url}/predict"))
    assert text == f"{entry['backend']} {chosen['precision']}"
