"""Rollouts under load, as an operator runs them: a shadow's cost, a canary's share, a wrong
candidate rolled back with no failed request, and a promotion under load.

    PYTHONPATH=. .venv/bin/python -m benchmarks.rollout [--seconds 30] [--pairs 3] [--workers 1]

A repository is made from the digits demo (artifacts/model.onnx, version 1); a real server
(``python -m app``, default settings) serves it while 16 closed-loop clients post digit PNGs to
/predict, and then gets, as an operator would add them:

- version 2: the same weights exported again (``python -m model export`` of the demo's
  checkpoint): a shadow's cost (closed-loop throughput with and without it, interleaved) and
  agreement, then a 20% canary's share;
- version 3: the demo trained for one epoch (``python -m model build --epochs 1 --seed 7``),
  which passes its own reference check but answers worse: rolled back automatically, as a canary
  and as a shadow, with ``min_requests`` 200;
- a 20% canary of version 2 promoted 8 s into a run.

Every answer is counted by status and by the version that computed it. Writes
benchmarks/results/rollout.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.load import cpu_named, digits, run_server
from benchmarks.swap import metadata_props
from core.contract import ModelMetadata

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLIENTS = 16
REEXPORTED = ROOT / "artifacts/bench/digits-reexport.onnx"
ONE_EPOCH = ROOT / "artifacts/bench/digits-epoch1.onnx"


@dataclass
class Run:
    seconds: float
    statuses: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    after: Counter[str] = field(default_factory=Counter)  # versions answered after ``mark``
    mark: float | None = None

    def summary(self) -> dict[str, Any]:
        answered = sum(self.versions.values())
        return {
            "seconds": round(self.seconds, 1),
            "requests_per_s": round(answered / self.seconds, 1),
            "statuses": dict(self.statuses),
            "versions": dict(self.versions),
            "p50_ms": round(float(np.percentile(self.latencies_ms, 50)), 1),
            "p99_ms": round(float(np.percentile(self.latencies_ms, 99)), 1),
            **({"versions_after": dict(self.after)} if self.mark is not None else {}),
        }


async def closed_loop(
    url: str,
    images: list[bytes],
    seconds: float,
    during: Callable[[Run], Coroutine[Any, Any, None]] | None = None,
    until: Callable[[], bool] = lambda: False,
) -> Run:
    """``CLIENTS`` keep-alive clients for ``seconds`` (or until ``until()``); ``during`` runs
    beside them from the start."""
    run = Run(seconds)
    began = time.perf_counter()
    stop = began + seconds

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        sent = index
        while time.perf_counter() < stop and not until():
            form = aiohttp.FormData()
            form.add_field("files", images[sent % len(images)], filename="d.png")
            sent += CLIENTS
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", data=form) as response:
                    body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.statuses[type(exc).__name__] += 1
                continue
            run.statuses[str(response.status)] += 1
            if response.status == 200:
                version = json.loads(body)["model_version"]
                run.versions[version] += 1
                run.latencies_ms.append(1000 * (time.perf_counter() - started))
                if run.mark is not None and started > run.mark:
                    run.after[version] += 1

    connector = aiohttp.TCPConnector(limit=CLIENTS + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        side = asyncio.create_task(during(run)) if during is not None else None
        await asyncio.gather(*(client(session, i) for i in range(CLIENTS)))
        if side is not None:
            await side
    run.seconds = time.perf_counter() - began
    return run


class Operator:
    """The rollout API, as an operator calls it."""

    def __init__(self, url: str, name: str) -> None:
        self.url = f"{url}/v2/repository/models/{name}/rollout"

    async def call(self, method: str, path: str = "", body: Any = None) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url + path, json=body) as response,
        ):
            answer: dict[str, Any] = await response.json()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: {response.status} {answer}")
            return answer


def build_candidates() -> None:
    python = sys.executable
    if not REEXPORTED.exists():
        checkpoint = ROOT / "artifacts/model.checkpoint.pt"
        command = ["-m", "model", "export", str(checkpoint), "--out", str(REEXPORTED)]
        subprocess.run([python, *command], cwd=ROOT, check=True)
    if not ONE_EPOCH.exists():
        command = ["-m", "model", "build", "--epochs", "1", "--seed", "7", "--out", str(ONE_EPOCH)]
        subprocess.run([python, *command], cwd=ROOT, check=True)


async def scenarios(url: str, name: str, seconds: float, pairs: int) -> dict[str, Any]:
    images = digits(200)
    api = Operator(url, name)
    out: dict[str, Any] = {}
    await closed_loop(url, images, 5)  # warm

    # A shadow's cost: without and with, interleaved: the machine's speed drifts between runs.
    plain, shadowed, states = [], [], []
    for _ in range(pairs):
        plain.append((await closed_loop(url, images, seconds)).summary())
        await api.call("PUT", body={"candidate": "2", "mode": "shadow"})
        shadowed.append((await closed_loop(url, images, seconds)).summary())
        await asyncio.sleep(0.3)
        states.append(await api.call("GET"))
        await api.call("DELETE")
    ratio = [
        s["requests_per_s"] / p["requests_per_s"] for p, s in zip(plain, shadowed, strict=True)
    ]
    out["shadow"] = {
        "without": plain,
        "with": shadowed,
        "ratios": ratio,
        "median_ratio": float(np.median(ratio)),
        "states": states,
    }

    await api.call("PUT", body={"candidate": "2", "mode": "canary", "percent": 20})
    canary = (await closed_loop(url, images, seconds)).summary()
    await asyncio.sleep(0.3)
    out["canary"] = {"run": canary, "state": await api.call("DELETE")}

    for mode in ("canary", "shadow"):
        plan: dict[str, Any] = {"candidate": "3", "mode": mode, "min_requests": 200}
        plan |= {"percent": 20} if mode == "canary" else {}
        await api.call("PUT", body=plan)
        ended: dict[str, Any] = {}

        async def watch(run: Run, ended: dict[str, Any] = ended) -> None:
            give_up = time.perf_counter() + 240
            while time.perf_counter() < give_up:
                state = await api.call("GET")
                if state["status"] != "running":
                    ended.update(state)
                    run.mark = time.perf_counter() + 0.5  # what came after the rollback
                    await asyncio.sleep(3)
                    ended["stop"] = True
                    return
                await asyncio.sleep(0.2)

        def stopped(ended: dict[str, Any] = ended) -> bool:
            return "stop" in ended

        run = await closed_loop(url, images, 300, watch, until=stopped)
        out[f"rollback_{mode}"] = {"run": run.summary(), "state": ended}

    await api.call("PUT", body={"candidate": "2", "mode": "canary", "percent": 20})

    async def promote(run: Run) -> None:
        await asyncio.sleep(8)
        answer = await api.call("POST", "/promote")
        run.mark = time.perf_counter()
        out["promote_state"] = answer

    out["promote"] = (await closed_loop(url, images, 16, promote)).summary()
    return out


def report(result: dict[str, Any]) -> str:
    shadow, canary = result["shadow"], result["canary"]
    lines = [
        "# Rollouts under load",
        "",
        f"Measured {result['when']} on {result['cpu']}, {result['workers']} worker(s), "
        f"{CLIENTS} closed-loop clients posting digit PNGs to /predict, the digits demo as "
        "version 1, default settings (`rollout_compare_share` 0.05). "
        "`PYTHONPATH=. .venv/bin/python -m benchmarks.rollout`.",
        "",
        "| run | req/s | p50 ms | p99 ms | statuses | answered by |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, run: dict[str, Any]) -> None:
        lines.append(
            f"| {label} | {run['requests_per_s']} | {run['p50_ms']} | {run['p99_ms']} | "
            f"{run['statuses']} | {run['versions']} |"
        )

    for i, (plain, shadowed) in enumerate(zip(shadow["without"], shadow["with"], strict=True), 1):
        row(f"no rollout ({i})", plain)
        row(f"shadow of v2, same weights ({i})", shadowed)
    row("canary 20% of v2", canary["run"])
    for mode in ("canary", "shadow"):
        row(f"{mode} of v3 (1 epoch), until rolled back + 3 s", result[f"rollback_{mode}"]["run"])
    row("canary 20% of v2, promoted at 8 s", result["promote"])
    ratios = ", ".join(f"{r:.3f}" for r in shadow["ratios"])
    share = canary["run"]["versions"].get("2", 0) / sum(canary["run"]["versions"].values())
    lines += [
        "",
        f"- Shadow throughput / no rollout, pair by pair: {ratios} (median "
        f"{shadow['median_ratio']:.3f}). Agreement on the copies: "
        + ", ".join(
            f"{s['agreement']} over {s['compared']} compared ({s['dropped']} dropped)"
            for s in shadow["states"]
        )
        + ".",
        f"- Canary share answered by the candidate: {share:.3f} (asked 0.20); compared "
        f"{canary['state']['compared']}, agreement {canary['state']['agreement']}.",
    ]
    for mode in ("canary", "shadow"):
        state = result[f"rollback_{mode}"]["state"]
        after = result[f"rollback_{mode}"]["run"].get("versions_after")
        lines.append(
            f"- v3 as a {mode}: {state['status']} after {state['compared']} compared requests "
            f"(min_requests 200): {state['reason']}. Answered after it: {after}."
        )
    lines.append(
        f"- Promotion: answers after the promote returned: {result['promote']['versions_after']}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3, help="runs without and with a shadow")
    parser.add_argument("--out", default="rollout", help="results/OUT.{json,md}")
    args = parser.parse_args()
    build_candidates()
    model = ROOT / "artifacts/model.onnx"
    name = ModelMetadata.from_props(metadata_props(model)).name
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for version, source in ((1, model),):
            (root / name / str(version)).mkdir(parents=True)
            shutil.copy(source, root / name / str(version) / "model.onnx")
        with run_server(None, model_repository=str(root), workers=str(args.workers)) as server:
            for version, source in ((2, REEXPORTED), (3, ONE_EPOCH)):  # added as an operator would
                (root / name / str(version)).mkdir(parents=True)
                shutil.copy(source, root / name / str(version) / "model.onnx")
            result = asyncio.run(scenarios(server.url, name, args.seconds, args.pairs))
    result |= {"when": time.strftime("%Y-%m-%d"), "cpu": cpu_named(), "workers": args.workers}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
