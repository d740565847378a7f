"""Model updates under load: versions loaded, switched, unloaded and a broken one refused while
clients keep sending, second by second.

    PYTHONPATH=. .venv/bin/python -m benchmarks --sections swap [--quick]
    PYTHONPATH=. .venv/bin/python -m benchmarks.swap \
        --model artifacts/bench/resnet50-random-fp32.onnx --out swap-fp32

A repository is made from ``--model`` (version 1); a real server serves it while 16 closed-loop
clients post a 500x375 JPEG to /predict and 4 send it to the protocol's infer. On a schedule:
version 2 is written beside and renamed in, and loaded beside version 1 (``latest:2``); version 1 is
unloaded (the server's ``latest``); the server goes back to version 1 (``specific``); a truncated
version 3 is loaded and refused. Every answer is counted by status and by the version that
computed it; the server's RSS is sampled. Writes benchmarks/results/swap[-NAME].{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from benchmarks.load import photo, run_server
from core.contract import ModelMetadata

RESULTS = Path(__file__).resolve().parent / "results"
REST_CLIENTS, PROTOCOL_CLIENTS = 16, 4


def schedule(step_s: float) -> list[tuple[float, str, dict[str, Any] | None]]:
    """(when, what, the load request's version policy) after the steady start."""
    return [
        (step_s, "load v2 beside v1", {"latest": {"num_versions": 2}}),
        (2 * step_s, "unload v1 (policy latest)", None),
        (3 * step_s, "back to v1", {"specific": {"versions": [1]}}),
        (4 * step_s, "load a broken v3", None),
    ]


async def drive(url: str, name: str, root: Path, step_s: float) -> dict[str, Any]:
    jpeg = photo(500, 375, 0)
    infer = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(jpeg).decode()],
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
        }
    )
    seconds: dict[int, Counter[str]] = defaultdict(Counter)
    latencies: dict[int, list[float]] = defaultdict(list)
    stop = asyncio.Event()
    began = time.perf_counter()

    def record(status: int | str, version: str, latency: float) -> None:
        second = int(time.perf_counter() - began)
        seconds[second][f"{status} v{version}" if version else str(status)] += 1
        if status == 200:
            latencies[second].append(latency)

    async def rest(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            form = aiohttp.FormData()
            form.add_field("files", jpeg, filename="photo.jpg", content_type="image/jpeg")
            await call(session, "/predict", form)

    async def protocol(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            await call(session, f"/v2/models/{name}/infer", infer)

    async def call(session: aiohttp.ClientSession, path: str, body: Any) -> None:
        started = time.perf_counter()
        try:
            async with session.post(url + path, data=body) as response:
                answer = await response.read()
                version = json.loads(answer).get("model_version", "") if response.ok else ""
                record(response.status, version, time.perf_counter() - started)
        except (aiohttp.ClientError, TimeoutError) as exc:
            record(type(exc).__name__, "", 0.0)

    events: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=REST_CLIENTS + PROTOCOL_CLIENTS + 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.create_task(rest(session)) for _ in range(REST_CLIENTS)]
        clients += [asyncio.create_task(protocol(session)) for _ in range(PROTOCOL_CLIENTS)]
        for at, what, policy in schedule(step_s):
            await asyncio.sleep(max(0.0, began + at - time.perf_counter()))
            prepare(root, name, what)
            started = time.perf_counter() - began
            body = {"parameters": {"config": json.dumps({"version_policy": policy})}}
            async with session.post(
                f"{url}/v2/repository/models/{name}/load", json=body if policy else {}
            ) as response:
                answer = (await response.read()).decode()
            events.append(
                {
                    "what": what,
                    "start_s": round(started, 2),
                    "end_s": round(time.perf_counter() - began, 2),
                    "status": response.status,
                    "answer": answer[:200],
                }
            )
        await asyncio.sleep(max(0.0, began + 5 * step_s - time.perf_counter()))
        stop.set()
        await asyncio.gather(*clients)
    return {"events": events, "seconds": seconds, "latencies": latencies}


def prepare(root: Path, name: str, what: str) -> None:
    """The files each step needs: written beside the repository, then renamed in."""
    folder = root / name
    if what.startswith("load v2"):
        shutil.copytree(folder / "1", folder / "2.partial")
        (folder / "2.partial").rename(folder / "2")
    elif what.startswith("load a broken"):
        (folder / "3.partial").mkdir()
        data = (folder / "1" / "model.onnx").read_bytes()
        (folder / "3.partial" / "model.onnx").write_bytes(data[: len(data) // 2])
        (folder / "3.partial").rename(folder / "3")


async def sample_rss(pid: int, stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    process, began = psutil.Process(pid), time.perf_counter()
    while not stop.is_set():
        out.append((time.perf_counter() - began, process.memory_info().rss / 2**20))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def run(model: Path, step_s: float, out: str) -> dict[str, Any]:
    metadata = ModelMetadata.from_props(metadata_props(model))
    with tempfile.TemporaryDirectory(prefix="swap-") as workdir:
        root = Path(workdir) / "repository"
        (root / metadata.name / "1").mkdir(parents=True)
        shutil.copy(model, root / metadata.name / "1" / "model.onnx")
        with run_server(None, model_repository=str(root)) as server:

            async def measured() -> tuple[dict[str, Any], list[tuple[float, float]]]:
                stop, rss = asyncio.Event(), list[tuple[float, float]]()
                sampler = asyncio.create_task(sample_rss(server.process.pid, stop, rss))
                timeline = await drive(server.url, metadata.name, root, step_s)
                stop.set()
                await sampler
                return timeline, rss

            timeline, rss = asyncio.run(measured())
    result = summarise(timeline, rss, step_s)
    result |= {"model": str(model), "name": metadata.name, "step_s": step_s}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{out}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{out}.png")
    return result


def metadata_props(model: Path) -> dict[str, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def summarise(
    timeline: dict[str, Any], rss: list[tuple[float, float]], step_s: float
) -> dict[str, Any]:
    rows = []
    for second in sorted(timeline["seconds"]):
        counts = timeline["seconds"][second]
        ms = np.asarray(timeline["latencies"][second] or [np.nan]) * 1000
        rows.append(
            {
                "second": second,
                "answers": sum(counts.values()),
                "ok": sum(v for k, v in counts.items() if k.startswith("200")),
                "p99_ms": float(np.percentile(ms, 99)),
                "by": dict(counts),
                "rss_mib": max((r for t, r in rss if int(t) == second), default=float("nan")),
            }
        )
    rows = rows[1:-1]  # the first and last seconds are partial
    busy = {
        s
        for event in timeline["events"]
        for s in range(int(event["start_s"]), int(event["end_s"]) + 1)
    }
    steady = [r["ok"] for r in rows if r["second"] not in busy and r["second"] >= 2]
    during = [r["ok"] for r in rows if r["second"] in busy]
    statuses: Counter[str] = Counter()
    for row in rows:
        statuses.update({k.split()[0]: v for k, v in row["by"].items()})
    return {
        "events": timeline["events"],
        "rows": rows,
        "statuses": dict(statuses),
        "steady_median_rps": float(np.median(steady)) if steady else float("nan"),
        "swap_min_rps": float(min(during)) if during else float("nan"),
        "swap_median_rps": float(np.median(during)) if during else float("nan"),
        "peak_rss_mib": max((r for _, r in rss), default=float("nan")),
        "steady_rss_mib": float(np.median([r for _, r in rss[: max(1, int(step_s * 10))]])),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Model updates under load: {result['name']}",
        "",
        f"{REST_CLIENTS} clients on /predict and {PROTOCOL_CLIENTS} on the protocol's infer, one "
        f"500x375 JPEG each; a step every {result['step_s']:g} s.",
        "",
        f"- statuses over the run: {result['statuses']}",
        f"- requests/s: steady median {result['steady_median_rps']:.1f}; during a load, median "
        f"{result['swap_median_rps']:.1f}, lowest second {result['swap_min_rps']:.1f} "
        f"({result['swap_min_rps'] / result['steady_median_rps']:.0%} of steady)",
        f"- server RSS: {result['steady_rss_mib']:.0f} MiB steady, peak "
        f"{result['peak_rss_mib']:.0f} MiB (two versions resident during a swap)",
        "",
        "| step | started s | answered s | status | answer |",
        "|---|---|---|---|---|",
    ]
    for event in result["events"]:
        answer = event["answer"].replace("|", "\\|") or "(empty)"
        lines.append(
            f"| {event['what']} | {event['start_s']} | {event['end_s']} | {event['status']} "
            f"| {answer} |"
        )
    lines += ["", "| second | answers | 200s | p99 ms | by status and version | RSS MiB |"]
    lines.append("|---|---|---|---|---|---|")
    for row in result["rows"]:
        by = ", ".join(f"{k}: {v}" for k, v in sorted(row["by"].items()))
        lines.append(
            f"| {row['second']} | {row['answers']} | {row['ok']} | {row['p99_ms']:.0f} | {by} "
            f"| {row['rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    seconds = [r["second"] for r in rows]
    versions = sorted({k.split()[1] for r in rows for k in r["by"] if " " in k})
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    bottom_stack = np.zeros(len(rows))
    for version in versions:
        counts = np.asarray([r["by"].get(f"200 {version}", 0) for r in rows], dtype=float)
        top.bar(seconds, counts, bottom=bottom_stack, label=f"answered by {version}")
        bottom_stack += counts
    errors = [r["answers"] - r["ok"] for r in rows]
    top.bar(seconds, errors, bottom=bottom_stack, color="red", label="not 200")
    for event in result["events"]:
        top.axvline(event["start_s"], color="grey", linestyle=":")
        top.text(event["start_s"], top.get_ylim()[1] * 0.95, event["what"], fontsize=7, rotation=90)
    top.set_ylabel("requests / s")
    top.legend(fontsize=8, loc="lower right")
    bottom.plot(seconds, [r["p99_ms"] for r in rows], label="p99 ms")
    bottom.plot(seconds, [r["rss_mib"] for r in rows], label="server RSS MiB")
    bottom.set_xlabel("second")
    bottom.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=Path("artifacts/model.onnx"))
    parser.add_argument("--step-s", type=float, default=8.0, help="seconds between steps")
    parser.add_argument("--out", default="swap", help="results file stem")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"{args.model} is missing: make build (or make bench-models)")
    result = run(args.model, args.step_s, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
