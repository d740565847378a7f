"""Are the embeddings and heatmaps useful, and what do they cost? Measured on real servers.

    PYTHONPATH=. .venv/bin/python -m benchmarks.embeddings neighbours    # the digits demo
    PYTHONPATH=. .venv/bin/python -m benchmarks.embeddings canvas --out /tmp/canvas   # data
    PYTHONPATH=. .venv/bin/python -m benchmarks.embeddings localisation --model M --data /tmp/canvas
    PYTHONPATH=. .venv/bin/python -m benchmarks.embeddings speed      # /predict, /embed, /explain

- ``neighbours``: 1-nearest-neighbour accuracy by cosine over ``/embed`` vectors of the digits
  demo, the training split as the index and the validation split as queries (the splits
  ``model build`` uses).
- ``canvas`` writes the smallest experiment that gives maps room: each digit, scaled to 24x24,
  placed at a random spot inside one cell of a 4x4 grid on a white 128x128 canvas (train and
  val folders, and where each val digit is). The demo trains at 16x16, whose layer4 map is 1x1.
- ``localisation``: for a model trained on the canvas, the share of held-out images whose heatmap
  (the protocol's ``heatmap``, 4x4 at 128x128) peaks in the cell that holds the digit; chance is
  1/16. Also its top-1.
- ``speed``: closed loop, 16 clients, the same photo, ``/predict``, ``/embed`` and ``/explain``
  interleaved in rounds on one server: images per second each, and the ratios.

Writes benchmarks/results/embeddings.json (``--results``), one entry per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.load import Server, free_port, photo, run_server
from benchmarks.load import _wait_ready as wait_ready
from benchmarks.peers.run import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "embeddings.json"
CANVAS, CELLS, DIGIT = 128, 4, 24


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _digits() -> tuple[list[Image.Image], list[int], list[Image.Image], list[int]]:
    from model.data import digit_images

    train_x, train_y, val_x, val_y = digit_images()
    return list(train_x), [int(y) for y in train_y], list(val_x), [int(y) for y in val_y]


async def _post_all(
    url: str, path: str, payloads: list[bytes], params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Each payload's result, 16 images a request."""
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for start in range(0, len(payloads), 16):
            chunk = payloads[start : start + 16]
            files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(chunk)]
            response = await client.post(path, files=files, params=params)
            response.raise_for_status()
            results += response.json()["results"]
    return results


def neighbours(model: Path) -> dict[str, Any]:
    train_x, train_y, val_x, val_y = _digits()
    with run_server(model) as server:
        index = asyncio.run(_post_all(server.url, "/embed", [_png(i) for i in train_x]))
        queries = asyncio.run(_post_all(server.url, "/embed", [_png(i) for i in val_x]))
    keys = np.array([r["embedding"] for r in index], dtype=np.float32)
    asked = np.array([r["embedding"] for r in queries], dtype=np.float32)
    nearest = np.argmax(asked @ keys.T, axis=1)  # cosine: the vectors come L2-normalised
    correct = np.array(train_y)[nearest] == np.array(val_y)
    return {
        "index_images": len(keys),
        "queries": len(asked),
        "dimensions": int(keys.shape[1]),
        "one_nn_accuracy": round(float(correct.mean()), 4),
    }


def canvas(out: Path, seed: int = 0) -> dict[str, Any]:
    """Writes out/{train,val}/<digit>/*.png and out/cells.json (each val image's cell)."""
    rng = np.random.default_rng(seed)
    train_x, train_y, val_x, val_y = _digits()
    cells: dict[str, list[int]] = {}
    cell = CANVAS // CELLS
    for split, images, labels in (("train", train_x, train_y), ("val", val_x, val_y)):
        for index, (digit, label) in enumerate(zip(images, labels, strict=True)):
            row, col = (int(v) for v in rng.integers(0, CELLS, 2))
            dy, dx = (int(v) for v in rng.integers(0, cell - DIGIT + 1, 2))
            image = Image.new("RGB", (CANVAS, CANVAS), "white")
            scaled = digit.convert("RGB").resize((DIGIT, DIGIT), Image.Resampling.BILINEAR)
            image.paste(scaled, (col * cell + dx, row * cell + dy))
            path = out / split / str(label) / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            if split == "val":
                cells[str(path.relative_to(out))] = [row, col]
    (out / "cells.json").write_text(json.dumps(cells))
    return {"train": len(train_x), "val": len(val_x), "canvas": CANVAS, "cells": CELLS}


def localisation(model: Path, data: Path) -> dict[str, Any]:
    cells = json.loads((data / "cells.json").read_text())
    paths = sorted(cells)
    payloads = [(data / path).read_bytes() for path in paths]
    labels = [int(Path(path).parent.name) for path in paths]
    with run_server(model) as server:
        maps, tops = asyncio.run(_heatmaps(server.url, payloads))
    hits = [
        np.unravel_index(int(np.argmax(m)), m.shape) == tuple(cells[path])
        for m, path in zip(maps, paths, strict=True)
    ]
    return {
        "images": len(paths),
        "map": list(maps[0].shape),
        "peak_in_digit_cell": round(float(np.mean(hits)), 4),
        "chance": round(1 / CELLS**2, 4),
        "top1": round(float(np.mean(np.array(tops) == np.array(labels))), 4),
    }


async def _heatmaps(url: str, payloads: list[bytes]) -> tuple[list[np.ndarray], list[int]]:
    """Each image's map of its top class at the map's resolution (the protocol's output), and
    its top class."""
    maps: list[np.ndarray] = []
    tops: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        model = (await client.get("/v1/models")).json()["default_model"]
        for start in range(0, len(payloads), 16):
            chunk = payloads[start : start + 16]
            request = {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "BYTES",
                        "shape": [len(chunk)],
                        "data": [base64.b64encode(data).decode() for data in chunk],
                    }
                ],
                "outputs": [{"name": "heatmap"}, {"name": "probabilities"}],
            }
            response = await client.post(f"/v2/models/{model}/infer", json=request)
            response.raise_for_status()
            outputs = {o["name"]: o for o in response.json()["outputs"]}
            shape = outputs["heatmap"]["shape"]
            maps += list(np.array(outputs["heatmap"]["data"], dtype=np.float32).reshape(shape))
            probabilities = np.array(outputs["probabilities"]["data"]).reshape(
                outputs["probabilities"]["shape"]
            )
            tops += [int(i) for i in probabilities.argmax(axis=1)]
    return maps, tops


async def _closed_loop(url: str, path: str, data: bytes, seconds: float) -> float:
    """Images per second answered 200 by 16 clients sending ``data`` to ``path`` for ``seconds``."""
    done = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                files = [("files", ("photo.jpg", data, "image/jpeg"))]
                response = await client.post(path, files=files)
                if response.status_code == 200:
                    done += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(16)))
        return done / (time.monotonic() - started)


def speed(
    model: Path, seconds: float, rounds: int, baseline: tuple[Path, Path] | None = None
) -> dict[str, Any]:
    """``baseline``: (a checkout, its model file), whose ``/predict`` is measured in the same
    rounds, on its own server: what ``/predict`` cost before."""
    data = photo(500, 375, 0)
    paths = ("/predict", "/embed", "/explain")
    rates: dict[str, list[float]] = {path: [] for path in paths}
    if baseline is not None:
        rates["baseline /predict"] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(run_server(model))
        before = None
        if baseline is not None:
            before = stack.enter_context(_checkout_server(*baseline))
        for path in paths:  # warm each path's batches and threads
            asyncio.run(_closed_loop(server.url, path, data, 2))
        for _ in range(rounds):
            for path in paths:
                rates[path].append(asyncio.run(_closed_loop(server.url, path, data, seconds)))
            if before is not None:
                rate = asyncio.run(_closed_loop(before.url, "/predict", data, seconds))
                rates["baseline /predict"].append(rate)
    medians = {path: statistics.median(values) for path, values in rates.items()}
    figures = {
        "clients": 16,
        "seconds_each": seconds,
        "rounds": rounds,
        "images_per_s": {path: [round(v, 1) for v in values] for path, values in rates.items()},
        "median_images_per_s": {path: round(v, 1) for path, v in medians.items()},
        "embed_over_predict": round(medians["/embed"] / medians["/predict"], 3),
        "explain_over_predict": round(medians["/explain"] / medians["/predict"], 3),
    }
    if baseline is not None:
        figures["baseline"] = f"{baseline[0]} serving {baseline[1]}"
        figures["predict_over_baseline"] = round(
            medians["/predict"] / medians["baseline /predict"], 3
        )
    return figures


@contextlib.contextmanager
def _checkout_server(root: Path, model: Path) -> Iterator[Any]:
    """``python -m app`` of another checkout (its own code, on this venv), on ``model``."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "RESNET_SERVE_MODEL_PATH": str(model),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_LOG_LEVEL": "warning",
        "RESNET_SERVE_GRPC_PORT": "0",
    }
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=root, env=env)
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        asyncio.run(wait_ready(server))
        yield server
    finally:
        process.terminate()
        process.wait(timeout=60)


def _record(name: str, model: Path | None, figures: dict[str, Any], results: Path) -> None:
    recorded = json.loads(results.read_text()) if results.exists() else {}
    recorded[name] = {
        "model": str(model.relative_to(ROOT) if model and model.is_relative_to(ROOT) else model),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **figures,
    }
    results.write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps(recorded[name], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["neighbours", "canvas", "localisation", "speed"])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model.onnx")
    parser.add_argument("--data", type=Path, help="the canvas folder (localisation)")
    parser.add_argument("--out", type=Path, help="where canvas writes its folders")
    parser.add_argument("--seconds", type=float, default=8.0, help="each speed probe")
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds, interleaved")
    parser.add_argument(
        "--baseline",
        help="CHECKOUT:MODEL, another checkout's /predict on its model file, in the same rounds",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.what == "canvas":
        print(json.dumps(canvas(args.out)))
        return
    if args.what == "neighbours":
        figures = neighbours(args.model)
    elif args.what == "localisation":
        figures = localisation(args.model, args.data)
    else:
        baseline = None
        if args.baseline:
            root, _, path = args.baseline.partition(":")
            baseline = (Path(root).resolve(), Path(path).resolve())
        figures = speed(args.model, args.seconds, args.rounds, baseline)
    _record(args.what, args.model, figures, args.results)


if __name__ == "__main__":
    main()
