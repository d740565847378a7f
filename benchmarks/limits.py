"""Per-key rate limits under load: the limited key gets its rate, another key does not notice.

    PYTHONPATH=. .venv/bin/python -m benchmarks.limits \
        [--model artifacts/bench/digits-epoch1.onnx] [--rate 50] [--seconds 10]

Two keys: "limited" (``rate=R burst=10``) and "other" (no limit, 4 closed-loop clients). For
each set-up, three phases of 2 s warm-up and the measured seconds each: "other" alone; beside
the limited key sending exactly its rate (open loop, Poisson arrivals at R: what the limit lets
through anyway); beside 32 closed-loop clients of the limited key that ignore every refusal and
send again at once (an abusive caller). The limit works where "other" fares the same beside the
abusive caller as beside the polite one: the excess costs it nothing. Set-ups:

- one server, one worker;
- one server, 2 workers (the limit in shared memory);
- two servers sharing one Debian redis-server (clients spread over both);
- the same, with Redis killed halfway through the together phase: no request may fail (each
  server then limits on its own, so the limited key may get up to 2R).

The client is benchmarks.openloop's lean keep-alive one (its CPU is reported). Writes
benchmarks/results/limits.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.load import cpu_named, digits, run_server
from benchmarks.openloop import Client, Schedule, Target, probe
from benchmarks.peers.drive import BOUNDARY, form
from tests.helpers.redis import RedisServer, redis_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LIMITED_CLIENTS, OTHER_CLIENTS = 32, 4
WARMUP_S = 2.0
BURST = 10


def targets(urls: Sequence[str], key: str, bodies: tuple[bytes, ...]) -> list[Target]:
    found = []
    for url in urls:
        host, port = url.removeprefix("http://").split(":")
        found.append(
            Target(
                host,
                int(port),
                "/predict",
                bodies,
                f"multipart/form-data; boundary={BOUNDARY}",
                (("X-API-Key", key),),
            )
        )
    return found


async def closed_loop(
    servers: list[Target], clients: int, seconds: float, on_half: Any = None
) -> dict[str, Any]:
    """``clients`` sending back to back, spread over ``servers``; ``on_half``: called halfway
    through the measured seconds."""
    loop = asyncio.get_running_loop()
    schedule = Schedule(timeout_s=10.0, max_connections=clients * 2)
    pools = [Client(target, schedule) for target in servers]
    began = loop.time()
    window = (began + WARMUP_S, began + WARMUP_S + seconds)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []

    async def client(index: int) -> None:
        pool, sent = pools[index % len(pools)], index
        while loop.time() < window[1]:
            started = loop.time()
            status = await pool.send(sent)
            sent += clients
            if started >= window[0]:
                statuses[status] += 1
                if status == "200":
                    latencies.append(1000 * (loop.time() - started))

    async def halfway() -> None:
        await asyncio.sleep(window[0] + seconds / 2 - loop.time())
        await asyncio.to_thread(on_half)

    extra = [halfway()] if on_half is not None else []
    await asyncio.gather(*(client(index) for index in range(clients)), *extra)
    for pool in pools:
        await pool.close()
    return {
        "ok_per_s": statuses["200"] / seconds,
        "refused_per_s": statuses["429"] / seconds,
        "statuses": dict(statuses.most_common()),
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
    }


async def polite(servers: list[Target], rate: float, seconds: float) -> dict[str, Any]:
    """The limited key at exactly its rate, spread over ``servers``."""
    schedule = Schedule(warmup_s=WARMUP_S, seconds=seconds, bound_ms=1e9)
    found = await asyncio.gather(*(probe(t, rate / len(servers), schedule) for t in servers))
    statuses: Counter[str] = Counter()
    for one in found:
        statuses.update(one.statuses)
    return {"ok_per_s": statuses["200"] / seconds, "statuses": dict(statuses.most_common())}


async def phases(
    urls: list[str],
    bodies: tuple[bytes, ...],
    seconds: float,
    rate: float,
    on_half: Any = None,
) -> dict[str, Any]:
    other = targets(urls, "other-key", bodies)
    limited = targets(urls, "limited-key", bodies)
    me = psutil.Process()
    alone = await closed_loop(other, OTHER_CLIENTS, seconds)
    beside_polite, polite_limited = await asyncio.gather(
        closed_loop(other, OTHER_CLIENTS, seconds), polite(limited, rate, seconds)
    )
    cpu = me.cpu_times()
    started = time.perf_counter()
    together_other, together_limited = await asyncio.gather(
        closed_loop(other, OTHER_CLIENTS, seconds),
        closed_loop(limited, LIMITED_CLIENTS, seconds, on_half),
    )
    after = me.cpu_times()
    busy = (after.user + after.system - cpu.user - cpu.system) / (time.perf_counter() - started)
    return {
        "other_alone": alone,
        "other_beside_polite": beside_polite,
        "limited_polite": polite_limited,
        "other_together": together_other,
        "limited_together": together_limited,
        "client_cpu_percent": 100 * busy,
    }


@contextmanager
def servers(model: Path, keys: Path, count: int, **settings: str) -> Iterator[list[str]]:
    with ExitStack() as stack:
        started = [
            stack.enter_context(run_server(model, api_keys_file=str(keys), **settings))
            for _ in range(count)
        ]
        yield [server.url for server in started]


def measure(model: Path, rate: float, seconds: float) -> dict[str, Any]:
    bodies = tuple(form(data, "d.png", "image/png") for data in digits(16))
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "keys"
        keys.write_text(
            f"limited-key name=limited rate={rate:g} burst={BURST}\nother-key name=other\n"
        )
        with servers(model, keys, 1) as urls:
            runs["1 server, 1 worker"] = asyncio.run(phases(urls, bodies, seconds, rate))
        with servers(model, keys, 1, workers="2") as urls:
            runs["1 server, 2 workers"] = asyncio.run(phases(urls, bodies, seconds, rate))
        with redis_server(Path(folder)) as redis:
            shared = {"redis_url": redis.url}
            with servers(model, keys, 2, **shared) as urls:
                runs["2 servers, one Redis"] = asyncio.run(phases(urls, bodies, seconds, rate))
            with servers(model, keys, 2, **shared) as urls:
                stop: RedisServer = redis
                runs["2 servers, Redis killed halfway"] = asyncio.run(
                    phases(urls, bodies, seconds, rate, on_half=stop.stop)
                )
    return {
        "cpu": cpu_named(),
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "rate": rate,
        "burst": BURST,
        "seconds": seconds,
        "runs": runs,
    }


def report(result: dict[str, Any]) -> str:
    rate = result["rate"]
    lines = [
        "# Per-key rate limits",
        "",
        f'CPU: {result["cpu"]}. Model: `{result["model"]}`. Key "limited": rate={rate:g}/s, '
        f"burst={result['burst']}, {LIMITED_CLIENTS} closed-loop clients that resend at once "
        f'after every 429; key "other": no limit, {OTHER_CLIENTS} clients. '
        f"{result['seconds']:g} s measured per phase after {WARMUP_S:g} s of warm-up. "
        "Command: `PYTHONPATH=. .venv/bin/python -m benchmarks.limits`.",
        "",
        "| set-up | other alone: req/s, p99 | other beside the polite caller: req/s, p99 | "
        "other beside the abusive one: req/s, p99 (vs polite) | abusive: 200/s (vs rate), "
        "429/s | statuses other than 200, 429 | client CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        limited, alone, polite, beside = (
            run["limited_together"],
            run["other_alone"],
            run["other_beside_polite"],
            run["other_together"],
        )
        failed = {
            s: n
            for part in (limited, beside, polite, run["limited_polite"])
            for s, n in part["statuses"].items()
            if s not in ("200", "429")
        }
        lines.append(
            f"| {name} | {alone['ok_per_s']:.0f}, {alone['p99_ms']:.1f} ms | "
            f"{polite['ok_per_s']:.0f}, {polite['p99_ms']:.1f} ms | "
            f"{beside['ok_per_s']:.0f} ({beside['ok_per_s'] / polite['ok_per_s']:.2f}x), "
            f"{beside['p99_ms']:.1f} ms ({beside['p99_ms'] / polite['p99_ms']:.2f}x) | "
            f"{limited['ok_per_s']:.1f} ({limited['ok_per_s'] / rate:.2f}x), "
            f"{limited['refused_per_s']:.0f} | {failed or 'none'} | "
            f"{run['client_cpu_percent']:.0f}% |"
        )
    lines += [
        "",
        "Redis killed halfway: from then on each server limits the key on its own, so the "
        "limited key's 200s per second rise towards twice the rate for the rest of the phase; "
        "no request fails (statuses other than 200 and 429 would show above).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts/bench/digits-epoch1.onnx")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    arguments = parser.parse_args()
    result = measure(arguments.model.resolve(), arguments.rate, arguments.seconds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limits.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (RESULTS / "limits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
