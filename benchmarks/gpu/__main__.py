"""The GPU benchmark: in-process ceiling per bucket and variant, then HTTP load with JPEGs.

    python -m benchmarks.gpu --model artifacts/bench/resnet50-random-fp32.onnx   # on a GPU
    python -m benchmarks.gpu --quick --model tiny.onnx                           # smoke test, CPU

Writes benchmarks/results/gpu-<device>.{json,md,png}. ``make gpu-check`` runs it after the gpu
tests; docs/gpu-check.md says how to run that on a machine with no package registry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from app.runtimes.providers import CUDA
from benchmarks.gpu.fp16 import ensure_fp16
from benchmarks.gpu.http import sweep
from benchmarks.gpu.inprocess import CPU_VARIANTS, GPU_VARIANTS, run_variant
from benchmarks.gpu.report import markdown, plot
from benchmarks.load import photo
from benchmarks.peers.drive import Load
from core.preprocess import Recipe, decode

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    gpu = CUDA in ort.get_available_providers()
    if not gpu and not args.quick:
        print(
            f"benchmarks.gpu: no {CUDA} (have {ort.get_available_providers()}); --quick runs "
            "the CPU smoke test"
        )
        return 3
    if gpu and not args.quick:
        ensure_fp16(args.model)  # speed only: random weights make agreement meaningless
    photos = [photo(500, 375, seed) for seed in range(8)]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "device": _device(gpu),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "model": str(args.model),
        "quick": args.quick,
    }
    variants = CPU_VARIANTS if args.quick else GPU_VARIANTS
    results["inprocess"] = []
    for variant in variants:
        row = run_variant(variant, args.model, args.max_batch_size, args.seconds)
        results["inprocess"].append(row)
        print(json.dumps(row), flush=True)
    results["decode"] = _decode_capacity(args.model, photos[0])
    load = Load(warmup_s=args.load_warmup_s, seconds=args.load_seconds, start_timeout_s=180.0)
    settings = {
        "providers": "cpu" if args.quick else "cuda",
        "max_batch_size": str(args.max_batch_size),
    }
    results["http"] = [
        asyncio.run(sweep(args.model, workers, settings, photos, args.concurrency, load))
        for workers in args.workers
    ]
    results["seconds"] = time.perf_counter() - started
    _write(results, args.out / f"gpu-{args.name or _slug(results['device'])}")
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the fp32 file (fp16 beside it)")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test of the flow")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="per bucket, in process")
    parser.add_argument("--concurrency", type=_numbers, default=None)
    parser.add_argument("--workers", type=_numbers, default=None, help="e.g. 1,8")
    parser.add_argument("--load-seconds", type=float, default=None)
    parser.add_argument("--load-warmup-s", type=float, default=None)
    parser.add_argument("--name", help="results file stem after gpu- (default: the device)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "max_batch_size": 2 if quick else 64,
        "seconds": 0.2 if quick else 0.5,
        "concurrency": [1, 2] if quick else [1, 4, 16, 64, 256],
        "workers": [1] if quick else [1, max(2, (os.cpu_count() or 2) // 2)],
        "load_seconds": 1.0 if quick else 4.0,
        "load_warmup_s": 0.5 if quick else 2.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _decode_capacity(model: Path, jpeg: bytes, runs: int = 50) -> dict[str, float]:
    """One core's decode rate for the load's JPEG, and that times the cores: the front end's
    ceiling if decoding scaled perfectly over every core."""
    recipe = _recipe(model)
    decode(jpeg, recipe)
    started = time.process_time()
    for _ in range(runs):
        decode(jpeg, recipe)
    per_core = runs / (time.process_time() - started)
    return {"per_core_img_s": per_core, "all_cores_img_s": per_core * (os.cpu_count() or 1)}


def _recipe(model: Path) -> Recipe:
    from core.contract import ModelMetadata

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map).recipe


def _device(gpu: bool) -> str:
    nvidia_smi = shutil.which("nvidia-smi")
    if gpu and nvidia_smi:
        query = [nvidia_smi, "--query-gpu=name", "--format=csv,noheader"]
        found = subprocess.run(query, capture_output=True, text=True, check=False).stdout
        if found.strip():
            return found.strip().splitlines()[0]
    return f"cpu ({platform.processor() or platform.machine()})"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _write(results: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    raise SystemExit(main())
