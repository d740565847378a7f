"""A ``RESNET_SERVE_WORKERS=2`` server's workers, as its log announces them."""

from __future__ import annotations

from tests.helpers.server import Server, message_is


def start_workers(server: Server) -> dict[int, int]:
    """Waits until both workers accept; returns their pids by index."""
    started = [server.wait_for_log(message_is("worker started")) for _ in range(2)]
    return {int(str(entry["worker"])): int(str(entry["pid"])) for entry in started}
