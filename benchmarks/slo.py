"""Capacity under a latency bound, open loop, ours beside the peers, in one run.

    make bench-slo        # both models; ours, with and without a target, the script, LitServe
    PYTHONPATH=. .venv/bin/python -m benchmarks.slo --models digits --seconds 8   # a quick look

Each server alone, in turn, on the same ONNX file and the same 500x375 photo-like JPEGs sent as
multipart (benchmarks.peers: the same start-up, the project's decode for the peers):

1. closed loop (benchmarks.peers.drive): 1 client (the mean latency of a lone request) and
   16 clients (the throughput the server saturates at);
2. open loop (benchmarks.openloop): Poisson arrivals, bisecting the offered rate for the highest
   at which at least 99% of requests get a 200 within the model's bound (digits: 50 ms, 224x224
   ResNet-50: 300 ms), starting from half the closed-loop saturation;
3. ours only (``--overload``): twice its capacity offered, to see what the excess gets.

``--with-target`` adds ours again with ``RESNET_SERVE_LATENCY_TARGET_MS`` set to the model's bound;
``--ours LABEL:KEY=VALUE,...`` adds ours again with any settings on top (e.g. two workers).
Writes benchmarks/results/slo.{json,md,png} (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from app.runtimes import tuning
from benchmarks.load import photo
from benchmarks.openloop import Schedule, Target, capacity, probe
from benchmarks.openloop import as_dict as probe_dict
from benchmarks.peers.drive import BOUNDARY, Load, form, point, pooled, served_by, wait_ready
from benchmarks.peers.report import OK
from benchmarks.peers.run import cpu_model, free_port
from benchmarks.peers.servers import ROOT, Batching, start
from benchmarks.slo_report import markdown, plot

RESULTS = ROOT / "benchmarks" / "results"
TARGET = "RESNET_SERVE_LATENCY_TARGET_MS"


@dataclass(frozen=True)
class Model:
    path: Path
    bound_ms: float


MODELS = {
    "digits": Model(ROOT / "artifacts/model.onnx", 50.0),
    "resnet50-fp32": Model(ROOT / "artifacts/bench/resnet50-random-fp32.onnx", 300.0),
}


@dataclass(frozen=True)
class Contender:
    label: str
    server: str  # benchmarks.peers.servers.SERVERS
    settings: dict[str, str] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    contenders = [Contender(name, name) for name in args.servers] + args.ours
    schedule = Schedule(warmup_s=args.warmup, seconds=args.seconds, min_requests=args.min_requests)
    closed = Load(warmup_s=2.0, seconds=args.closed_seconds)
    photos = [photo(500, 375, seed) for seed in range(8)]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": psutil.cpu_count(),
            "flags": " ".join(tuning.cpu()["flags"]) or "no AVX2/AVX-512/AMX",
            "platform": platform.platform(),
        },
        "schedule": asdict(schedule),
        "closed_loop_s": args.closed_seconds,
        "runs": [],
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slo-") as workdir:
        for name in args.models:
            model = MODELS[name]
            if not model.path.is_file():
                raise SystemExit(f"{model.path} is missing (make build; make bench-models)")
            targeted = (
                [Contender("ours+target", "ours", {TARGET: f"{model.bound_ms:g}"})]
                if args.with_target
                else []
            )
            for contender in contenders + targeted:
                run = asyncio.run(
                    _measure(
                        contender,
                        model,
                        replace(schedule, bound_ms=model.bound_ms),
                        closed,
                        photos,
                        Path(workdir),
                        args.overload,
                    )
                )
                run["model"] = name
                print(json.dumps({k: v for k, v in run.items() if k != "probes"}), flush=True)
                results["runs"].append(run)
    results["elapsed_s"] = time.perf_counter() - began
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    plot(results, RESULTS / f"{args.out}.png")


async def _measure(
    contender: Contender,
    model: Model,
    schedule: Schedule,
    closed: Load,
    photos: list[bytes],
    workdir: Path,
    overload: bool,
) -> dict[str, Any]:
    port = free_port()
    server = start(
        contender.server, model.path, port, Batching(), workdir, settings=contender.settings
    )
    run: dict[str, Any] = {
        "server": contender.label,
        "settings": contender.settings,
        "bound_ms": schedule.bound_ms,
    }
    try:
        run["startup_s"] = await wait_ready(server, photos[0], closed)
        if contender.server == "ours":
            run["served_by"] = await served_by(server.url)
        lone = await point(server, photos, 1, closed)
        latencies = [1000 * (o.finished - o.started) for o in lone.outcomes if o.status == OK]
        run["c1"] = {**pooled([lone]), "mean_ms": statistics.fmean(latencies)}
        run["c16"] = pooled([await point(server, photos, 16, closed)])
        target = _target(port, photos)
        saturation = run["c16"]["images_per_s"]

        async def at(rate: float) -> Any:
            found = await probe(target, rate, schedule, lambda: sum(server.tree.cpu().values()))
            print(json.dumps({"server": contender.label, **probe_dict(found)}), flush=True)
            await asyncio.sleep(1.0)  # what the last probe left queued finishes
            return found

        run["capacity_per_s"], probes = await capacity(at, start=0.5 * saturation)
        if overload and contender.server == "ours" and run["capacity_per_s"]:
            probes.append(await at(2 * run["capacity_per_s"]))
            run["overload"] = probe_dict(probes[-1])
        run["probes"] = [probe_dict(p) for p in probes]
        run["capacity_vs_closed"] = run["capacity_per_s"] / saturation if saturation else None
    except (RuntimeError, OSError) as exc:
        run["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        server.tree.stop()
    return run


def _target(port: int, photos: list[bytes]) -> Target:
    return Target(
        host="127.0.0.1",
        port=port,
        path="/predict",
        bodies=tuple(form(data, "p.jpg", "image/jpeg") for data in photos),
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_models, default=list(MODELS), help="comma-separated")
    parser.add_argument(
        "--servers", type=lambda text: text.split(","), default=["ours", "handwritten", "litserve"]
    )
    parser.add_argument(
        "--ours", type=_ours, action="append", default=[], help="LABEL:KEY=VALUE,... (repeatable)"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured s per probe")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured s per probe")
    parser.add_argument(
        "--min-requests",
        type=int,
        default=Schedule.min_requests,
        help=f"a probe stretches (to {Schedule.max_seconds:g} s) to hold this many arrivals",
    )
    parser.add_argument("--closed-seconds", type=float, default=8.0, help="per closed-loop point")
    parser.add_argument("--overload", action="store_true", help="ours: 2x capacity, once")
    parser.add_argument(
        "--with-target", action="store_true", help="ours again, its latency target the bound"
    )
    parser.add_argument("--out", default="slo", help="results file stem")
    return parser.parse_args(argv)


def _models(text: str) -> list[str]:
    names = text.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown models {unknown}; choose from {list(MODELS)}")
    return names


def _ours(text: str) -> Contender:
    label, _, pairs = text.partition(":")
    settings = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return Contender(label, "ours", settings)


if __name__ == "__main__":
    main()
