"""The Open Inference Protocol over gRPC against the same protocol over REST with the binary
extension: one server serving both, the same 500x375 JPEG as a BYTES tensor, at 1, 16 and 64
closed-loop clients (one connection each), on the digits demo and the 224x224 model.

    PYTHONPATH=. .venv/bin/python -m benchmarks --sections grpc [--quick]
    PYTHONPATH=. .venv/bin/python -m benchmarks.grpc --seconds 10

Both clients send bytes prepared once (no client-side encoding in the loop); the protocols take
turns at each point, REST first then gRPC, then again the other way round, and each figure pools
both turns. Server CPU is the server process's user+system time over the turn.
Writes benchmarks/results/grpc.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import onnx
import psutil

from app.grpc import inference_pb2 as pb
from benchmarks.load import free_port, photo, run_server
from core.contract import ModelMetadata

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "digits": Path("artifacts/model.onnx"),
    "resnet50-224-fp32": Path("artifacts/bench/resnet50-random-fp32.onnx"),
}
CONCURRENCY = (1, 16, 64)
INFER = "/inference.GRPCInferenceService/ModelInfer"
Send = Callable[[int], Awaitable[bool]]


def rest_body(jpeg: bytes, output: dict[str, Any] | None = None) -> tuple[bytes, int]:
    """The protocol's infer over REST with the image as binary data: the body and the length of
    its JSON header. ``output``: the output's parameters (default: binary probabilities)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(jpeg) + 4},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": output or {"binary_data": True}}],
        }
    ).encode()
    return header + struct.pack("<I", len(jpeg)) + jpeg, len(header)


def grpc_body(name: str, jpeg: bytes) -> bytes:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="images", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(jpeg)) + jpeg)
    data: bytes = request.SerializeToString()
    return data


async def closed_loop(clients: list[Send], seconds: float, pid: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    server = psutil.Process(pid)
    cpu_before = sum(server.cpu_times()[:2])
    started = time.perf_counter()
    deadline = started + seconds

    async def client(send: Send, index: int) -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            if await send(index):
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1

    await asyncio.gather(*(client(send, i) for i, send in enumerate(clients)))
    wall = time.perf_counter() - started
    cpu = sum(server.cpu_times()[:2]) - cpu_before
    return {
        "answers": len(latencies),
        "failures": failures,
        "seconds": wall,
        "cpu_s": cpu,
        "latencies": latencies,
    }


async def rest_point(
    url: str, name: str, jpeg: bytes, clients: int, seconds: float, pid: int
) -> dict[str, Any]:
    body, header_length = rest_body(jpeg)
    headers = {
        "Inference-Header-Content-Length": str(header_length),
        "Content-Type": "application/octet-stream",
    }
    sessions = [aiohttp.ClientSession() for _ in range(clients)]  # a connection each
    target = f"{url}/v2/models/{name}/infer"

    def sender(session: aiohttp.ClientSession) -> Send:
        async def send(index: int) -> bool:
            async with session.post(target, data=body, headers=headers) as response:
                await response.read()
                return response.status == 200

        return send

    try:
        return await closed_loop([sender(s) for s in sessions], seconds, pid)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


async def grpc_point(
    address: str, name: str, jpeg: bytes, clients: int, seconds: float, pid: int
) -> dict[str, Any]:
    body = grpc_body(name, jpeg)
    channels = [grpc.aio.insecure_channel(address) for _ in range(clients)]  # a connection each

    def sender(channel: grpc.aio.Channel) -> Send:
        call = channel.unary_unary(INFER)

        async def send(index: int) -> bool:
            try:
                await call(body, timeout=60)
            except grpc.aio.AioRpcError:
                return False
            return True

        return send

    try:
        return await closed_loop([sender(c) for c in channels], seconds, pid)
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def summary(turns: list[dict[str, Any]]) -> dict[str, Any]:
    answers = sum(t["answers"] for t in turns)
    seconds = sum(t["seconds"] for t in turns)
    latencies = np.asarray([x for t in turns for x in t["latencies"]]) * 1000
    return {
        "images_per_s": answers / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if answers else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if answers else float("nan"),
        "server_cpu_ms_per_request": 1000 * sum(t["cpu_s"] for t in turns) / max(answers, 1),
        "failures": sum(t["failures"] for t in turns),
        "answers": answers,
    }


def measure(model: Path, seconds: float) -> dict[int, dict[str, dict[str, Any]]]:
    name = model_name(model)
    jpeg = photo(500, 375, 0)
    port = free_port()
    table: dict[int, dict[str, dict[str, Any]]] = {}
    with run_server(model, grpc_port=str(port), log_level="warning") as server:
        pid, address = server.process.pid, f"127.0.0.1:{port}"
        asyncio.run(rest_point(server.url, name, jpeg, 4, 2.0, pid))  # warm both paths
        asyncio.run(grpc_point(address, name, jpeg, 4, 2.0, pid))
        for clients in CONCURRENCY:
            turns: dict[str, list[dict[str, Any]]] = {"rest": [], "grpc": []}
            for order in (("rest", "grpc"), ("grpc", "rest")):
                for protocol in order:
                    point = (
                        rest_point(server.url, name, jpeg, clients, seconds / 2, pid)
                        if protocol == "rest"
                        else grpc_point(address, name, jpeg, clients, seconds / 2, pid)
                    )
                    turns[protocol].append(asyncio.run(point))
            table[clients] = {protocol: summary(t) for protocol, t in turns.items()}
            print(
                json.dumps({"model": str(model), "clients": clients, **table[clients]}), flush=True
            )
    return table


def model_name(model: Path) -> str:
    loaded = onnx.load(str(model), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in loaded.metadata_props}).name


def markdown(results: dict[str, dict[int, dict[str, dict[str, Any]]]], seconds: float) -> str:
    lines = [
        "## The Open Inference Protocol: gRPC against REST (binary extension)",
        "",
        f"`PYTHONPATH=. .venv/bin/python -m benchmarks.grpc --seconds {seconds:g}`: one server, a "
        "500x375 JPEG as BYTES [1], closed-loop clients with a connection each, the protocols "
        "taking turns at each point (two turns each, pooled).",
        "",
        "| model | clients | protocol | images/s | p50 ms | p99 ms | server CPU ms/request |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, table in results.items():
        for clients, protocols in table.items():
            for protocol, row in protocols.items():
                lines.append(
                    f"| {model} | {clients} | {protocol} | {row['images_per_s']:.1f} | "
                    f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                    f"{row['server_cpu_ms_per_request']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--seconds", type=float, default=10.0, help="per point and protocol")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    args = parser.parse_args(argv)
    results = {name: measure(MODELS[name], args.seconds) for name in args.models.split(",")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpc.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )
    (RESULTS / "grpc.md").write_text(markdown(results, args.seconds))
    print(markdown(results, args.seconds))


if __name__ == "__main__":
    main()
