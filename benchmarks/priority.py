"""Priority classes under overload: a high-priority key keeps its latency while normal and low
ones absorb the refusals.

    PYTHONPATH=. .venv/bin/python -m benchmarks.priority \
        [--model artifacts/bench/resnet50-random-fp32.onnx] [--seconds 15]

One server, three keys (``priority=high``, ``normal``, ``low``). First the server's capacity C:
16 closed-loop clients of the normal key for 8 s, its 200s per second. Then, open loop (Poisson
arrivals, latency from each request's scheduled arrival: benchmarks.openloop):

- "high alone": the high key at 0.2 C;
- "4x overload": the high key at 0.2 C again, beside the normal and low keys at 1.9 C each, so
  4 C is offered in all.

Writes benchmarks/results/priority.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.limits import closed_loop, targets
from benchmarks.load import cpu_named, photo, run_server
from benchmarks.openloop import Schedule, as_dict, probe
from benchmarks.peers.drive import form

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HIGH_SHARE, OTHERS_SHARE = 0.2, 1.9
KEYS = (
    "high-key name=high priority=high\n"
    "normal-key name=normal priority=normal\n"
    "low-key name=low priority=low\n"
)


async def measure_on(url: str, seconds: float) -> dict[str, Any]:
    bodies = tuple(form(photo(500, 375, seed), "p.jpg", "image/jpeg") for seed in range(8))
    saturated = await closed_loop(targets([url], "normal-key", bodies), 16, 8.0)
    capacity = saturated["ok_per_s"]
    schedule = Schedule(warmup_s=3.0, seconds=seconds, bound_ms=1e9, max_connections=4096)

    def at(key: str, share: float, seed: int) -> Any:
        (target,) = targets([url], key, bodies)
        return probe(target, share * capacity, Schedule(**{**schedule.__dict__, "seed": seed}))

    alone = await at("high-key", HIGH_SHARE, 1)
    high, normal, low = await asyncio.gather(
        at("high-key", HIGH_SHARE, 2),
        at("normal-key", OTHERS_SHARE, 3),
        at("low-key", OTHERS_SHARE, 4),
    )
    return {
        "capacity_per_s": capacity,
        "capacity_p99_ms": saturated["p99_ms"],
        "high_alone": as_dict(alone),
        "overload": {"high": as_dict(high), "normal": as_dict(normal), "low": as_dict(low)},
    }


def measure(model: Path, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "keys"
        keys.write_text(KEYS)
        with run_server(model, api_keys_file=str(keys)) as server:
            result = asyncio.run(measure_on(server.url, seconds))
    return {
        "cpu": cpu_named(),
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "seconds": seconds,
        **result,
    }


def report(result: dict[str, Any]) -> str:
    alone, overload = result["high_alone"], result["overload"]
    ratio = overload["high"]["p99_ms"] / alone["p99_ms"]
    lines = [
        "# Priority classes at 4x overload",
        "",
        f"CPU: {result['cpu']}. Model: `{result['model']}`, a 500x375 JPEG per request. "
        f"Capacity C = {result['capacity_per_s']:.1f} req/s (16 closed-loop clients of the "
        f"normal key). Open loop, Poisson arrivals, {result['seconds']:g} s measured after 3 s "
        "of warm-up; latency from each request's scheduled arrival. "
        "Command: `PYTHONPATH=. .venv/bin/python -m benchmarks.priority`.",
        "",
        "| phase | key | offered req/s | 200/s | p50 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("high alone", "high", alone)] + [
        ("4x overload", key, overload[key]) for key in ("high", "normal", "low")
    ]
    for phase, key, run in rows:
        p50 = f"{run['p50_ms']:.0f}" if run["p50_ms"] is not None else "-"
        p99 = f"{run['p99_ms']:.0f}" if run["p99_ms"] is not None else "-"
        lines.append(
            f"| {phase} | {key} | {run['offered_per_s']:.1f} | {run['answered_per_s']:.1f} | "
            f"{p50} | {p99} | {run['statuses']} |"
        )
    lines += [
        "",
        f"The high key's p99 at 4x overload is {ratio:.2f}x its p99 alone.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=ROOT / "artifacts/bench/resnet50-random-fp32.onnx"
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    arguments = parser.parse_args()
    result = measure(arguments.model.resolve(), arguments.seconds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "priority.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (RESULTS / "priority.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
