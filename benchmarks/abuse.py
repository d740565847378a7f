"""Abusive clients against a real ``python -m app``: slow uploads and huge images.

    PYTHONPATH=. python -m benchmarks.abuse [--model artifacts/model.onnx]

Writes benchmarks/results/abuse.{json,md}. Every socket targets 127.0.0.1; every scenario is
bounded in clients and seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image

from benchmarks.load import ROOT, photo, run_server

RESULTS = Path(__file__).resolve().parent / "results"
TRICKLERS = 100


def honest(url: str, jpeg: bytes) -> float:
    started = time.perf_counter()
    files = [("files", ("photo.jpg", jpeg, "image/jpeg"))]
    response = httpx.post(f"{url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return (time.perf_counter() - started) * 1000


def slow_uploads(model: Path, jpeg: bytes) -> dict[str, Any]:
    """100 clients announce 1 MB and send 1 byte a second; honest clients meanwhile."""
    with run_server(model, upload_timeout_ms="30000") as server:
        host, port = server.url.removeprefix("http://").split(":")
        sockets = []
        for _ in range(TRICKLERS):
            sock = socket.create_connection((host, int(port)))
            head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            sock.sendall(f"{head}Content-Length: 1000000\r\n\r\n".encode())
            sockets.append(sock)
        latencies = []
        for _ in range(10):
            for sock in sockets:
                sock.sendall(b"\x00")
            latencies.append(honest(server.url, jpeg))
            time.sleep(max(0.0, 1.0 - latencies[-1] / 1000))
        for sock in sockets:
            sock.close()
    return {
        "tricklers": TRICKLERS,
        "honest_requests": len(latencies),
        "honest_ok": len(latencies),
        "honest_median_ms": statistics.median(latencies),
        "honest_max_ms": max(latencies),
    }


def solid_png(side: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (seed * 40 % 256, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def huge_images(model: Path, jpeg: bytes, budget: str | None) -> dict[str, Any]:
    """One request of 16 solid 6300x6300 PNGs (131 KB each), and an honest request meanwhile."""
    pngs = [("files", (f"big{i}.png", solid_png(6300, i), "image/png")) for i in range(16)]
    settings = {"request_timeout_ms": "120000"} | ({"max_request_pixels": budget} if budget else {})
    with run_server(model, **settings) as server:
        process = psutil.Process(server.process.pid)
        honest(server.url, jpeg)
        rss_before = process.memory_info().rss
        cpu_before = sum(process.cpu_times()[:2])
        with ThreadPoolExecutor(1) as pool:
            started = time.perf_counter()
            hog = pool.submit(httpx.post, f"{server.url}/predict", files=pngs, timeout=300)
            time.sleep(0.5)  # let it start decoding
            during = [honest(server.url, jpeg) for _ in range(5)]
            answer = hog.result()
            hog_s = time.perf_counter() - started
        rss_after = process.memory_info().rss
        cpu = sum(process.cpu_times()[:2]) - cpu_before
    return {
        "max_request_pixels": budget or "default",
        "hog_status": answer.status_code,
        "hog_seconds": hog_s,
        "hog_server_cpu_s": cpu,
        "honest_max_ms_during": max(during),
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts/model.onnx")
    args = parser.parse_args()
    jpeg = photo(500, 375, 0)
    results = {
        "slow_uploads": slow_uploads(args.model, jpeg),
        "huge_images_default_budget": huge_images(args.model, jpeg, None),
        "huge_images_budget_raised": huge_images(args.model, jpeg, "700000000"),
    }
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "abuse.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "abuse.md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    slow = results["slow_uploads"]
    lines = [
        "## Slow uploads",
        "",
        f"{slow['tricklers']} clients announce 1 MB and send 1 byte/s; one honest 500x375 JPEG "
        f"a second: {slow['honest_ok']}/{slow['honest_requests']} served, median "
        f"{slow['honest_median_ms']:.0f} ms, max {slow['honest_max_ms']:.0f} ms.",
        "",
        "## One request of 16 solid 6300x6300 PNGs, 5 honest requests meanwhile",
        "",
        "| max_request_pixels | hog status | hog s | hog server CPU s | honest max ms "
        "| RSS before MiB | RSS after MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("huge_images_default_budget", "huge_images_budget_raised"):
        r = results[key]
        lines.append(
            f"| {r['max_request_pixels']} | {r['hog_status']} | {r['hog_seconds']:.1f} "
            f"| {r['hog_server_cpu_s']:.1f} | {r['honest_max_ms_during']:.0f} "
            f"| {r['rss_before_mib']:.0f} | {r['rss_after_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
