"""A long run of mixed traffic at about 70% of saturation, watching for what grows: the server's
RSS, open file descriptors and threads, and the p99, sampled every 10 s.

    PYTHONPATH=. .venv/bin/python -m benchmarks.soak --minutes 30

The digits demo on a real ``python -m app``. First its saturated rate is measured (16 closed-loop
clients posting a 500x375 JPEG, 15 s); then requests arrive open-loop at ``--load`` (0.7) of it,
mixed: multipart uploads of three photo sizes (most), raw image bodies, the protocol's infer with
binary data, and now and then a bad request (a text file, a truncated JPEG, an oversized body) or a
slow uploader. Writes benchmarks/results/soak.{json,md,png}; the check: RSS at the end is within
``--max-growth-mib`` (5) of RSS once warm (the first sample after the first minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from benchmarks.grpc import rest_body
from benchmarks.load import photo, run_point, run_server

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = Path("artifacts/model.onnx")
SAMPLE_S = 10.0


# (kind, weight): what an arrival is.
MIX = [
    ("multipart-small", 0.35),
    ("multipart-photo", 0.25),
    ("multipart-hd", 0.05),
    ("raw", 0.15),
    ("oip-binary", 0.12),
    ("bad-text", 0.03),
    ("bad-truncated", 0.02),
    ("oversized", 0.02),
    ("slow-upload", 0.01),
]


class Traffic:
    def __init__(self, url: str, model: str, max_request_bytes: int) -> None:
        self.url = url
        self.model = model
        self.images = {
            "small": photo(320, 240, 1),
            "photo": photo(500, 375, 2),
            "hd": photo(1920, 1080, 3),
        }
        self.oversized = b"\xff" * (max_request_bytes + 1)
        self.statuses: Counter[str] = Counter()
        self.latencies: list[tuple[float, float]] = []  # (when, seconds) of each 200

    async def send(self, session: aiohttp.ClientSession, kind: str) -> None:
        started = time.perf_counter()
        try:
            status = await self._send(session, kind)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        self.statuses[f"{kind}:{status}"] += 1
        if status == "200" and kind != "slow-upload":  # its 2 s are the client's, not ours
            self.latencies.append((time.monotonic(), time.perf_counter() - started))

    async def _send(self, session: aiohttp.ClientSession, kind: str) -> str:
        url = f"{self.url}/predict"
        if kind.startswith("multipart"):
            form = aiohttp.FormData()
            form.add_field(
                "files",
                self.images[kind.split("-")[1]],
                filename="a.jpg",
                content_type="image/jpeg",
            )
            return await _status(session.post(url, data=form))
        if kind == "raw":
            body, headers = self.images["photo"], {"Content-Type": "image/jpeg"}
            return await _status(session.post(url, data=body, headers=headers))
        if kind == "oip-binary":
            return await _status(self._infer(session))
        if kind == "bad-text":
            form = aiohttp.FormData()
            form.add_field("files", b"not an image", filename="a.txt", content_type="text/plain")
            return await _status(session.post(url, data=form))
        if kind == "bad-truncated":
            headers = {"Content-Type": "image/jpeg"}
            return await _status(
                session.post(url, data=self.images["photo"][:4000], headers=headers)
            )
        if kind == "oversized":
            headers = {"Content-Type": "image/jpeg"}
            return await _status(session.post(url, data=self.oversized, headers=headers))
        return await _status(
            session.post(
                url, data=_trickle(self.images["small"]), headers={"Content-Type": "image/jpeg"}
            )
        )

    def _infer(self, session: aiohttp.ClientSession) -> Any:
        body, header_length = rest_body(self.images["photo"], {"classification": 1})
        headers = {
            "Inference-Header-Content-Length": str(header_length),
            "Content-Type": "application/octet-stream",
        }
        return session.post(f"{self.url}/v2/models/{self.model}/infer", data=body, headers=headers)


async def _status(request: Any) -> str:
    async with request as response:
        await response.read()
        return str(response.status)


async def _trickle(data: bytes) -> Any:
    """An upload that takes about 2 s: a slow client, not a hostile one."""
    for start in range(0, len(data), len(data) // 8 + 1):
        yield data[start : start + len(data) // 8 + 1]
        await asyncio.sleep(0.25)


async def soak(
    url: str, pid: int, rate: float, minutes: float, model: str, limit: int
) -> dict[str, Any]:
    rng = random.Random(0)
    kinds, weights = zip(*MIX, strict=True)
    traffic = Traffic(url, model, limit)
    server = psutil.Process(pid)
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    end = started + minutes * 60
    pending: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        next_sample = started + SAMPLE_S
        arrival = started
        while time.monotonic() < end:
            arrival += rng.expovariate(rate)  # Poisson arrivals at ``rate``
            await asyncio.sleep(max(0.0, arrival - time.monotonic()))
            kind = rng.choices(kinds, weights)[0]
            task = asyncio.ensure_future(traffic.send(session, kind))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if time.monotonic() >= next_sample:
                samples.append(_sample(server, traffic, started, next_sample - SAMPLE_S))
                print(json.dumps(samples[-1]), flush=True)
                next_sample += SAMPLE_S
        await asyncio.gather(*pending)
    samples.append(_sample(server, traffic, started, next_sample - SAMPLE_S))
    return {"samples": samples, "statuses": dict(traffic.statuses)}


def _sample(
    server: psutil.Process, traffic: Traffic, started: float, since: float
) -> dict[str, Any]:
    recent = [seconds for when, seconds in traffic.latencies if when >= since]
    return {
        "t_s": round(time.monotonic() - started, 1),
        "rss_mib": server.memory_info().rss / 2**20,
        "fds": server.num_fds(),
        "threads": server.num_threads(),
        "answers_200": len(recent),
        "p99_ms": float(np.percentile(recent, 99) * 1000) if recent else None,
    }


def warm_sample(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The first sample after the first minute (the first one in a shorter run)."""
    return next((s for s in samples if s["t_s"] >= 60), samples[0])


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    samples = result["samples"]
    warm, last = warm_sample(samples), samples[-1]
    growth = last["rss_mib"] - warm["rss_mib"]
    totals: Counter[str] = Counter()
    for key, count in result["statuses"].items():
        totals[key.split(":", 1)[1]] += count
    verdict = "within" if growth <= args.max_growth_mib else "OVER"
    fds = [s["fds"] for s in samples]
    threads = [s["threads"] for s in samples]
    command = f"PYTHONPATH=. .venv/bin/python -m benchmarks.soak --minutes {args.minutes:g}"
    lines = [
        f"## Soak: {args.minutes:g} minutes of mixed traffic at {args.load:.0%} of saturation",
        "",
        f"`{command}`: the digits demo, saturated at {result['saturated_rps']:.1f} req/s "
        f"(16 clients, 500x375 JPEG), driven at {result['rate']:.1f} req/s (Poisson arrivals).",
        "",
        f"- RSS once warm ({warm['t_s']:.0f} s) {warm['rss_mib']:.1f} MiB, at the end "
        f"{last['rss_mib']:.1f} MiB: growth {growth:+.1f} MiB "
        f"({verdict} the {args.max_growth_mib:g} MiB check)",
        f"- open file descriptors {min(fds)}..{max(fds)}, threads {min(threads)}..{max(threads)}",
        f"- answers by status: {dict(sorted(totals.items()))}",
        "",
        "p99: of the 200s in each 10 s, slow uploads left out (their 2 s are the client's).",
        "",
        "| t (s) | RSS MiB | fds | threads | 200s in 10 s | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for s in samples:
        p99 = f"{s['p99_ms']:.0f}" if s["p99_ms"] is not None else "-"
        lines.append(
            f"| {s['t_s']:.0f} | {s['rss_mib']:.1f} | {s['fds']} | {s['threads']} | "
            f"{s['answers_200']} | {p99} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] / 60 for s in samples]
    figure, (rss, p99) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rss.plot(t, [s["rss_mib"] for s in samples])
    rss.set_ylabel("server RSS (MiB)")
    p99.plot(t, [s["p99_ms"] or np.nan for s in samples], color="tab:orange")
    p99.set_ylabel("p99 of 200s (ms)")
    p99.set_xlabel("minutes")
    figure.suptitle("Soak: mixed traffic at 70% of saturation")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--load", type=float, default=0.7, help="share of the saturated rate")
    parser.add_argument("--max-growth-mib", type=float, default=5.0)
    parser.add_argument("--out", default="soak")
    args = parser.parse_args(argv)
    limit = 2_000_000
    with run_server(MODEL, max_request_bytes=str(limit)) as server:
        pool = [("photo.jpg", photo(500, 375, 2))]
        asyncio.run(run_point(server, pool, 16, 1, 3.0))  # warm
        saturated = asyncio.run(run_point(server, pool, 16, 1, 15.0))
        rate = args.load * saturated["requests_ok"] / saturated["seconds"]
        with urllib.request.urlopen(f"{server.url}/v1/model") as answer:
            name = json.loads(answer.read())["name"]
        result = asyncio.run(soak(server.url, server.process.pid, rate, args.minutes, name, limit))
    result |= {"saturated_rps": saturated["requests_ok"] / saturated["seconds"], "rate": rate}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(result, args))
    plot(result, RESULTS / f"{args.out}.png")
    print(markdown(result, args))
    samples = result["samples"]
    return (
        0 if samples[-1]["rss_mib"] - warm_sample(samples)["rss_mib"] <= args.max_growth_mib else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
