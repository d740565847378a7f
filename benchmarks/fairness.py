"""Fair shares between callers: a light caller's latency beside a heavy one, each with its own key.

    PYTHONPATH=. .venv/bin/python -m benchmarks.fairness

The digits demo on a real ``python -m app`` with two API keys in the key file (``light`` and
``heavy``). The light caller runs ``--light`` (2) closed-loop clients posting one ~100 KB JPEG each
request, first alone, then beside the heavy caller's ``--heavy`` (64) closed-loop clients, which
wait ``Retry-After`` when refused (``--abusive``: retry at once). Reports each caller's
answers, refusals and latency percentiles; the targets: the light caller's p99 beside the heavy one
within 2x of its p99 alone, and none of its requests refused while the heavy caller's are.
Writes benchmarks/results/fairness.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.load import photo, run_server

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = Path("artifacts/model.onnx")
KEYS = {"light": "light-caller-key", "heavy": "heavy-caller-key"}


async def drive(
    url: str,
    key: str,
    clients: int,
    seconds: float,
    data: bytes,
    stop: asyncio.Event | None,
    honour_retry_after: bool = True,
) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds`` (or until ``stop``): latencies of the 200s
    and every status. A refused client waits ``Retry-After`` unless told to retry at once."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
                form = aiohttp.FormData()
                form.add_field("files", data, filename="photo.jpg", content_type="image/jpeg")
                started = time.perf_counter()
                try:
                    async with session.post(f"{url}/predict", data=form, headers=headers) as r:
                        await r.read()
                        statuses[str(r.status)] += 1
                        if r.status == 200:
                            latencies.append(time.perf_counter() - started)
                        elif honour_retry_after and "Retry-After" in r.headers:
                            await asyncio.sleep(float(r.headers["Retry-After"]))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "clients": clients,
        "seconds": wall,
        "answered_200": len(latencies),
        "per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": dict(statuses),
    }


async def measure(url: str, args: argparse.Namespace, data: bytes) -> dict[str, Any]:
    # Warm the caches and the cost estimate before anything is measured.
    await drive(url, KEYS["light"], args.light, 3, data, None)
    alone = await drive(url, KEYS["light"], args.light, args.seconds, data, None)
    stop = asyncio.Event()
    heavy_task = asyncio.create_task(
        drive(url, KEYS["heavy"], args.heavy, 1e9, data, stop, not args.abusive)
    )
    await asyncio.sleep(3)  # the heavy caller's backlog builds up first
    beside = await drive(url, KEYS["light"], args.light, args.seconds, data, None)
    stop.set()
    heavy = await heavy_task
    return {"light_alone": alone, "light_beside_heavy": beside, "heavy": heavy}


def markdown(result: dict[str, Any], command: str) -> str:
    rows = [
        ("light caller alone", result["light_alone"]),
        ("light caller beside the heavy one", result["light_beside_heavy"]),
        ("heavy caller", result["heavy"]),
    ]
    alone, beside = result["light_alone"], result["light_beside_heavy"]
    ratio = beside["p99_ms"] / alone["p99_ms"]
    lines = [
        "# Fair shares between callers",
        "",
        f"`{command}`, {result['date']}, the digits demo, one {result['image_bytes'] // 1000} KB "
        "JPEG per request, closed-loop clients, two API keys; the heavy caller "
        + (
            "retries at once when refused."
            if result["args"]["abusive"]
            else "waits Retry-After when refused."
        ),
        "",
        "| caller | clients | answered 200 | per s | p50 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(row["statuses"].items()))
        lines.append(
            f"| {name} | {row['clients']} | {row['answered_200']} | {row['per_s']:.1f} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {statuses} |"
        )
    refused = sum(v for k, v in beside["statuses"].items() if k != "200")
    heavy_refused = sum(v for k, v in result["heavy"]["statuses"].items() if k != "200")
    lines += [
        "",
        f"The light caller's p99 beside the heavy one is {ratio:.2f}x its p99 alone "
        f"(target <= 2); {refused} of its requests were not answered 200 "
        f"(the heavy caller's: {heavy_refused}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--light", type=int, default=2)
    parser.add_argument("--heavy", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--abusive",
        action="store_true",
        help="the heavy caller retries at once when refused, ignoring Retry-After",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting (RESNET_SERVE_NAME), repeatable",
    )
    args = parser.parse_args(argv)
    data = photo(800, 600, 7)
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "keys"
        keys.write_text("".join(f"{key} name={name}\n" for name, key in KEYS.items()))
        settings = dict(item.split("=", 1) for item in args.setting)
        with run_server(args.model, api_keys_file=str(keys), **settings) as server:
            result = asyncio.run(measure(server.url, args, data))
    result |= {"date": time.strftime("%Y-%m-%d"), "image_bytes": len(data), "args": vars(args)}
    command = "PYTHONPATH=. .venv/bin/python -m benchmarks.fairness" + (
        " " + " ".join(argv) if argv else ""
    )
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))
    alone, beside = result["light_alone"], result["light_beside_heavy"]
    return 0 if beside["p99_ms"] <= 2 * alone["p99_ms"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
