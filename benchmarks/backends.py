"""Every backend x precision this CPU has, in process, then the service with ``backend=auto``
against ``backend=onnxruntime`` and against ``auto`` with bf16 off, in one run (docs/backends.md).

    make bench-models
    PYTHONPATH=. .venv/bin/python -m benchmarks.backends [--seconds 6] [--serve-seconds 20]
    # another file, in process only (the digits demo; its int8 rows say why they are skipped):
    PYTHONPATH=. .venv/bin/python -m benchmarks.backends --fp32 artifacts/model.onnx \
        --int8 artifacts/model.int8.onnx --no-service --out backends-digits

In process: each candidate in a fresh process (its peak RSS is its own), opened as the server opens
it (``app.runtimes.registry``' loaders, the server's lanes and threads), run by as many threads at
once as the server has lanes, at batch 1 and 8; and OpenVINO's own throughput hint with requests in
flight (``AsyncInferQueue``), to measure the lane-to-stream mapping against it. Each candidate's
largest probability difference from ONNX Runtime fp32 on the same 8 images (the file's reference
evaluation images) is reported.
The service: 500x375 JPEG uploads, one per request, at 8 and 64 clients (``benchmarks.load``).
Results: ``benchmarks/results/backends.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ceiling import measure
from benchmarks.load import photo, run_point, run_server
from core.reference import eval_images

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FP32 = ROOT / "artifacts" / "bench" / "resnet50-random-fp32.onnx"
INT8 = ROOT / "artifacts" / "bench" / "resnet50-random-int8.onnx"
# (backend, precision, mode): "lanes" is how the server runs it, "hint" OpenVINO's own.
CANDIDATES = [
    ("onnxruntime", "fp32", "lanes"),
    ("openvino", "fp32", "lanes"),
    ("openvino", "fp32", "hint"),
    ("openvino", "bf16", "lanes"),
    ("openvino", "bf16", "hint"),
    ("onnxruntime", "int8", "lanes"),
    ("openvino", "int8", "lanes"),
    ("openvino", "int8", "hint"),
]
COMMAND = "PYTHONPATH=. .venv/bin/python -m benchmarks.backends"
BATCHES = (1, 8)
HINT_REQUESTS = 4
CLIENTS = (8, 64)


def child(backend: str, precision: str, path: Path, mode: str, seconds: float, out: Path) -> None:
    """One candidate, measured in this process: writes its figures and its outputs."""
    from app.repository.configs import runtime_config
    from app.runtimes import openvino
    from app.runtimes.registry import Candidate, open_candidate
    from app.settings import Settings

    config = runtime_config(Settings(model_path=path))
    lanes = config.lanes
    started = time.perf_counter()
    model = open_candidate(Candidate(backend, precision), replace(config, precision=precision))
    load_s = time.perf_counter() - started
    outputs = model.predict(_probe(model.metadata))
    figures: dict[str, Any] = {"load_s": round(load_s, 2), "lanes": lanes}
    for batch in BATCHES:
        if mode == "lanes":
            result = measure(model, batch, seconds, lanes)
        else:
            result = _hint(path, precision, batch, seconds, openvino.core())
        figures[f"batch_{batch}"] = round(result["images_per_s"], 2)
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    np.save(out.with_suffix(".npy"), outputs)
    out.write_text(json.dumps(figures))


def _probe(metadata: Any) -> np.ndarray:
    """Eight images to compare the candidates' outputs on: the file's reference evaluation
    images (real ones: random pixels through random weights give one saturated class, and
    differences of 1e-13 that say nothing), random pixels for a file without them."""
    reference = metadata.reference or {}
    if "eval" in reference:
        return eval_images(reference["eval"])[:8]
    size = metadata.recipe.crop_size
    return np.random.default_rng(1).integers(0, 256, (8, size, size, 3), dtype=np.uint8)


def _hint(path: Path, precision: str, batch: int, seconds: float, core: Any) -> dict[str, Any]:
    """OpenVINO's throughput hint, ``HINT_REQUESTS`` requests in flight."""
    import openvino  # type: ignore[import-untyped]

    hint = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}[precision]
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": hint}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    queue = openvino.AsyncInferQueue(compiled, HINT_REQUESTS)
    crop = compiled.input("images").get_partial_shape()[1].get_length()
    images = np.random.default_rng(0).integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
    for _ in range(HINT_REQUESTS):
        queue.start_async({"images": images})
    queue.wait_all()
    runs, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        queue.start_async({"images": images})
        runs += 1
    queue.wait_all()
    return {"images_per_s": batch * runs / (time.perf_counter() - began)}


def in_process(seconds: float, rounds: int, fp32: Path, int8: Path) -> list[dict[str, Any]]:
    """Every candidate once per round, the rounds one after another (the machine's noise spread
    over all of them); each figure is the best of its rounds: a ceiling."""
    from app.runtimes import openvino

    rows: list[dict[str, Any]] = [
        {"backend": backend, "precision": precision, "mode": mode}
        for backend, precision, mode in CANDIDATES
    ]
    reference: np.ndarray | None = None  # ONNX Runtime fp32's outputs: it comes first
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for row, (backend, precision, mode) in zip(rows, CANDIDATES, strict=True):
                path = int8 if precision == "int8" else fp32
                if precision == "bf16" and not openvino.has_bf16():
                    row["skipped"] = "this CPU has no bf16"
                    continue
                if not path.is_file():
                    row["skipped"] = f"no {path.name}"
                    continue
                out = Path(tmp) / f"{backend}-{precision}-{mode}.json"
                args = [backend, precision, str(path), mode, str(seconds), str(out)]
                failure = _run_child(args)
                if failure is not None:
                    row["skipped"] = failure
                    continue
                figures = json.loads(out.read_text())
                print(json.dumps(row | figures | {"round": round_}), flush=True)
                for key in ("batch_1", "batch_8", "peak_rss_mib"):
                    figures[key] = max(figures[key], row.get(key, 0))
                outputs = np.load(out.with_suffix(".npy"))
                reference = outputs if reference is None else reference
                row |= figures | {"max_diff_vs_ort_fp32": float(np.abs(outputs - reference).max())}
    return rows


def _run_child(args: list[str]) -> str | None:
    """One candidate in a fresh process; why it failed, or None."""
    command = [sys.executable, "-m", "benchmarks.backends", "--child", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]


# The servers compared: (name in the tables, whether on the int8 file, settings).
SERVERS = [
    ("onnxruntime", False, {"backend": "onnxruntime"}),
    ("auto", False, {"backend": "auto"}),
    # A CPU without bf16, forced by the setting: must serve as backend=onnxruntime does.
    ("auto, bf16 off", False, {"backend": "auto", "bf16": "false"}),
    ("auto, int8", True, {"backend": "auto", "model_precision": "int8"}),
]


def service(seconds: float, rounds: int, fp32: Path, int8: Path) -> list[dict[str, Any]]:
    """Every server in turn, ``rounds`` times (alternating); the table takes the medians."""
    pool = [(f"photo{i}.jpg", photo(500, 375, i)) for i in range(16)]
    rows: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for name, on_int8, settings in SERVERS:
            rows += _serve(name, int8 if on_int8 else fp32, settings, pool, seconds, round_)
    return rows


def _serve(
    name: str,
    path: Path,
    settings: dict[str, str],
    pool: list[tuple[str, bytes]],
    seconds: float,
    round_: int,
) -> list[dict[str, Any]]:
    import httpx

    rows = []
    with run_server(path, **settings) as server:
        described = httpx.get(f"{server.url}/v1/models").json()["models"][0]
        for clients in CLIENTS:
            point = asyncio.run(run_point(server, pool, clients, 1, seconds))
            row = {
                "round": round_,
                "backend_setting": name,
                "served_by": f"{described['backend']['name']} {described['precision']}",
                "clients": clients,
                "images_per_s": round(point["images_per_s"], 2),
                "p50_ms": round(point["p50_ms"], 1),
                "p99_ms": round(point["p99_ms"], 1),
                "statuses": point["statuses"],
                "server_peak_rss_mib": round(point["server_peak_rss_mib"]),
                "candidates": described["backend"]["candidates"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Backends and precisions ({result['date']})",
        "",
        f"`{result['command']}`; {result['cpu']}.",
        "",
        f"## In process ({result['model']}; img/s)",
        "",
        "| backend | precision | run as | batch 1 | batch 8 | RSS MiB | max diff vs ORT fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    hint = f"throughput hint, {HINT_REQUESTS} in flight"
    for row in result["in_process"]:
        head = f"| {row['backend']} | {row['precision']} | "
        head += "server lanes" if row["mode"] == "lanes" else hint
        if "skipped" in row:
            lines.append(f"{head} | skipped: {row['skipped']} | | | |")
            continue
        lines.append(
            f"{head} | {row['batch_1']} | {row['batch_8']} | {row['peak_rss_mib']} | "
            f"{row['max_diff_vs_ort_fp32']:.1e} |"
        )
    measured = [r for r in result["in_process"] if "skipped" not in r]

    def best(int8: bool) -> float:
        speeds = [
            max(r["batch_1"], r["batch_8"]) for r in measured if (r["precision"] == "int8") == int8
        ]
        return max(speeds, default=0.0)

    if not result["service"]:
        return "\n".join([*lines, "", "The service: not measured (--no-service)."]) + "\n"
    lines += [
        "",
        "## The service (500x375 JPEG, one per request)",
        "",
        f"Share: of the best in-process figure above of the same grade (fp32-grade {best(False)} "
        f"img/s, int8 {best(True)} img/s).",
        "",
        "| backend setting | served by | clients | img/s | share | p50 ms | p99 ms | RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in _medians(result["service"]):
        yardstick = best("int8" in row["served_by"])
        share = f"{row['images_per_s'] / yardstick:.0%}" if yardstick else "-"
        lines.append(
            f"| {row['backend_setting']} | {row['served_by']} | {row['clients']} | "
            f"{row['images_per_s']} | {share} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['server_peak_rss_mib']} |"
        )
    lines += ["", "Every server's run (img/s), in the order they ran:", ""]
    lines += [
        f"- {r['backend_setting']} ({r['served_by']}), {r['clients']} clients: {r['images_per_s']}"
        for r in result["service"]
    ]
    return "\n".join(lines) + "\n"


def _medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, clients): the median of its rounds' figures."""
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["backend_setting"], row["clients"]), []).append(row)
    merged = []
    for runs in keyed.values():
        row = dict(runs[0])
        served = {r["served_by"] for r in runs}
        row["served_by"] = " / ".join(sorted(served))
        for key in ("images_per_s", "p50_ms", "p99_ms", "server_peak_rss_mib"):
            row[key] = round(float(np.median([r[key] for r in runs])), 2)
        merged.append(row)
    return merged


def cpu_description(bf16: bool) -> str:
    """The CPU, as far as bf16 speed depends on it: its name and model, and AMX beside
    avx512_bf16 (without AMX, some CPUs that report bf16 compute it no faster than fp32:
    docs/backends.md)."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = fields.get("flags", "").split()
    has = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return (
        f"{os.cpu_count()} cores, {fields.get('model name', 'unknown CPU')} (family "
        f"{fields.get('cpu family', '?')}, model {fields.get('model', '?')}), "
        f"{', '.join(has) or 'no AVX-512'}; OpenVINO bf16 {'yes' if bf16 else 'no'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve-seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--fp32", type=Path, default=FP32, help="the fp32 file (default: %(default)s)"
    )
    parser.add_argument(
        "--int8", type=Path, default=INT8, help="the int8 file (default: %(default)s)"
    )
    parser.add_argument("--no-service", action="store_true", help="in process only")
    parser.add_argument("--out", default="backends", help="results/<out>.{json,md}")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, precision, path, mode, seconds, out = args.child
        child(backend, precision, Path(path), mode, float(seconds), Path(out))
        return
    from app.runtimes import openvino

    fp32, int8 = args.fp32.resolve(), args.int8.resolve()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(
            ["PYTHONPATH=. .venv/bin/python -m benchmarks.backends", *sys.argv[1:]]
        ),
        "cpu": cpu_description(openvino.has_bf16()),
        "model": fp32.name,
        "in_process": in_process(args.seconds, args.rounds, fp32, int8),
        "service": [] if args.no_service else service(args.serve_seconds, args.rounds, fp32, int8),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
