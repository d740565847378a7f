"""Fair shares between callers: two API keys on a real server (tests/unit/test_app_fair.py: the
queues)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np

from tests.helpers.load import Point, closed_loop
from tests.helpers.metrics import scrape, wait_for_gauge
from tests.helpers.models import image_bytes
from tests.helpers.server import message_is, run_server


def test_a_light_caller_is_served_beside_a_heavy_one_and_only_the_heavy_one_is_refused(
    slow_model: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("heavy-key name=heavy\nlight-key name=light\n")
    png = image_bytes(1)
    settings = {"max_batch_size": "8", "intra_op_threads": "1", "admission_wait_ms": "300"}
    with run_server(slow_model, api_keys_file=str(keys), **settings) as server:
        server.wait_for_log(message_is("ready"))

        async def both() -> tuple[Point, Point]:
            heavy = asyncio.ensure_future(
                closed_loop(server.url, png, 48, 4, {"X-API-Key": "heavy-key"})
            )
            # Every heavy client's request is in (the +1: the scrape itself).
            await asyncio.to_thread(
                wait_for_gauge, server.url, "resnet_serve_requests_in_flight", 48 + 1
            )
            light = await closed_loop(server.url, png, 1, 2, {"X-API-Key": "light-key"})
            return await heavy, light

        heavy, light = asyncio.run(both())
        metrics = scrape(server.url)
    assert set(light.statuses) == {"200"}, light.statuses
    assert "503" in heavy.statuses, heavy.statuses
    light_ms = np.median(light.latencies_ms)
    heavy_ms = np.median(heavy.latencies_ms)
    assert light_ms < heavy_ms / 2, (light_ms, heavy_ms)
    counted = {
        (s.labels["caller"], s.labels["status"]): s.value
        for s in metrics["resnet_serve_caller_requests"].samples
        if s.name.endswith("_total")
    }
    assert counted[("light", "200")] == light.statuses["200"]
    assert ("light", "503") not in counted
    assert counted[("heavy", "503")] >= 1
    assert {label for label, _ in counted} == {"heavy", "light"}


def test_a_high_priority_key_goes_ahead_of_a_light_low_one(
    slow_model: Path, tmp_path: Path
) -> None:
    """Fair shares alone would serve the light caller (4 clients) faster than the heavy one
    (24): its priority puts the heavy high one first all the same."""
    keys = tmp_path / "keys"
    keys.write_text("high-key name=high priority=high\nlow-key name=low priority=low\n")
    png = image_bytes(1)
    settings = {"max_batch_size": "8", "intra_op_threads": "1", "admission_wait_ms": "300"}
    with run_server(slow_model, api_keys_file=str(keys), **settings) as server:
        server.wait_for_log(message_is("ready"))

        async def both() -> tuple[Point, Point]:
            high = asyncio.ensure_future(
                closed_loop(server.url, png, 24, 4, {"X-API-Key": "high-key"})
            )
            await asyncio.to_thread(
                wait_for_gauge, server.url, "resnet_serve_requests_in_flight", 24 + 1
            )
            low = asyncio.ensure_future(
                closed_loop(server.url, png, 4, 3, {"X-API-Key": "low-key"})
            )
            # The probes queue nowhere: no priority can starve them.
            probe = await asyncio.to_thread(httpx.get, f"{server.url}/healthz", timeout=5)
            assert probe.status_code == 200
            return await high, await low

        high, low = asyncio.run(both())
    assert set(high.statuses) == {"200"}, high.statuses
    high_ms, low_ms = np.median(high.latencies_ms), np.median(low.latencies_ms)
    assert high_ms < low_ms, (high_ms, low_ms)
