"""Faults under load, each counted: what was accepted, answered, refused and lost.

    PYTHONPATH=. .venv/bin/python -m benchmarks.chaos [--case NAME ...] [--seconds 6]

Every case starts a real ``python -m app`` on 127.0.0.1 with a model that costs real time (64x64
input, six 3x3 convolutions: about 20 ms an image on one core) and that misbehaves on purpose
through ONNX Runtime when asked to (tests.helpers.models: a red top-left pixel fails the run, a
blue one stalls it for seconds). ``--clients`` (16) keep-alive httpx clients post an image each,
back to back, while the fault is injected two seconds in. A request's outcome is one of:

- answered: an HTTP status (200; 500 only for the batch that failed; 503 and 504 are refusals,
  explicit and retryable);
- refused: the connection was refused (nothing was sent; a client can always retry);
- lost: the request was sent and no answer came (a read error, a dropped connection). Lost must be
  0 except for requests in flight on a SIGKILLed process, which the case says.

Writes benchmarks/results/chaos.{json,md}; exits 1 when a case loses what it must not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.load import run_server
from tests.helpers.models import POISON, SLOW_CROP, STALL, build_model, image_bytes

RESULTS = Path(__file__).resolve().parent / "results"
FAULT_AT_S = 2.0
LOST = (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadTimeout)


def solid(colour: tuple[int, int, int]) -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (80, 80), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Case:
    name: str
    what: str
    settings: dict[str, str]
    inject: Callable[[subprocess.Popen[bytes], Path, str], Any]  # (server, model, url)
    may_lose: bool = False  # requests in flight on a SIGKILLed process
    stops_server: bool = False
    stderr_full: bool = False
    repository: bool = False  # the model is version 1 of a watched repository


def workers_of(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The supervisor's workers (its children but multiprocessing's resource tracker)."""
    children = psutil.Process(process.pid).children()
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


async def load(url: str, clients: int, seconds: float, inject: Callable[[], Any]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds
    images = [image_bytes(seed, size=(80, 80)) for seed in range(8)]

    async def client(index: int) -> None:
        async with httpx.AsyncClient(timeout=30) as session:
            sent = 0
            while time.monotonic() < stop_at:
                data = images[(index + sent) % len(images)]
                sent += 1
                try:
                    response = await session.post(
                        f"{url}/predict", files=[("files", ("x.png", data, "image/png"))]
                    )
                    outcomes[str(response.status_code)] += 1
                except httpx.ConnectError:
                    outcomes["refused"] += 1
                    await asyncio.sleep(0.05)
                except LOST as exc:
                    outcomes[f"lost:{type(exc).__name__}"] += 1

    async def fault() -> None:
        await asyncio.sleep(FAULT_AT_S)
        await asyncio.to_thread(inject)

    await asyncio.gather(fault(), *(client(i) for i in range(clients)))
    return outcomes


def post_one(url: str, colour: tuple[int, int, int]) -> int:
    files = [("files", ("fault.png", solid(colour), "image/png"))]
    return httpx.post(f"{url}/predict", files=files, timeout=30).status_code


def cases() -> list[Case]:
    def sigterm(process: Any, model: Path, url: str) -> None:
        process.send_signal(signal.SIGTERM)

    def sigkill_worker(process: Any, model: Path, url: str) -> None:
        workers_of(process)[0].send_signal(signal.SIGKILL)

    def poison(process: Any, model: Path, url: str) -> int:
        return post_one(url, POISON)

    def stall(process: Any, model: Path, url: str) -> int:
        return post_one(url, STALL)

    def delete(process: Any, model: Path, url: str) -> None:
        model.unlink()

    def nothing(process: Any, model: Path, url: str) -> None:
        return None

    def replace_with_garbage(process: Any, model: Path, url: str) -> None:
        # Version 1's file overwritten in place, and a version 2 that is not a model at all.
        model.write_bytes(b"not an onnx model" * 100)
        staged = model.parent.parent / "2.partial"
        staged.mkdir()
        (staged / "model.onnx").write_bytes(b"\x00" * 4096)
        staged.rename(model.parent.parent / "2")
        time.sleep(2)  # two polls: the new version is tried and refused while the load goes on

    def vanish(process: Any, model: Path, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        body = image_bytes(99, size=(80, 80))
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for _ in range(20):  # each round: 4 gone mid-upload, 4 gone before their answer
            for whole in (False,) * 4 + (True,) * 4:
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(head + (body if whole else body[: len(body) // 2]))
            time.sleep(0.1)

    fast = {"request_timeout_ms": "2000"}
    return [
        Case("sigterm", "SIGTERM to a one-worker server", fast, sigterm, stops_server=True),
        Case(
            "sigterm-2-workers",
            "SIGTERM to the supervisor of 2 workers",
            fast | {"workers": "2"},
            sigterm,
            stops_server=True,
        ),
        Case(
            "sigkill-worker",
            "SIGKILL to one of 2 workers (the supervisor replaces it)",
            fast | {"workers": "2"},
            sigkill_worker,
            may_lose=True,
        ),
        Case("batch-fails", "one request makes its batch's run fail", fast, poison),
        Case(
            "stuck-lane",
            "one request stalls its lane for ~4 s (request_timeout_ms=1000)",
            {"request_timeout_ms": "1000", "inline_max_ms": "0"},
            stall,
        ),
        Case("model-file-deleted", "the model file deleted while serving", fast, delete),
        Case(
            "model-file-replaced",
            "version 1's file overwritten and a broken version 2 added (repository, polled)",
            fast | {"repository_poll_s": "0.5"},
            replace_with_garbage,
            repository=True,
        ),
        Case(
            "clients-vanish",
            "80 clients gone mid-upload and 80 gone before their answer, over 2 s",
            fast,
            vanish,
        ),
        Case(
            "logs-disk-full",
            "stderr on /dev/full at debug level (every log write fails)",
            fast | {"log_level": "debug"},
            nothing,
            stderr_full=True,
        ),
    ]


def run_case(case: Case, folder: Path, clients: int, seconds: float) -> dict[str, Any]:
    settings = dict(case.settings)
    where = folder / case.name
    if case.repository:
        settings["model_repository"] = str(where)
        where = where / "tiny-test" / "1"  # the folder is the model's name
    where.mkdir(parents=True)
    model = build_model(
        where / "model.onnx",
        crop_size=SLOW_CROP,
        conv_layers=6,
        width=64,
        stuck_iterations=3_000_000,
    )
    injected: list[Any] = []
    with (
        open("/dev/full", "w") if case.stderr_full else contextlib.nullcontext() as stderr,
        run_server(None if case.repository else model, stderr=stderr, **settings) as server,
    ):
        process, url = server.process, server.url
        outcomes = asyncio.run(
            load(url, clients, seconds, lambda: injected.append(case.inject(process, model, url)))
        )
        if not case.stops_server:  # it stops cleanly too (a second SIGTERM would force it)
            process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
    answered = sum(v for k, v in outcomes.items() if k.isdigit())
    refused = outcomes["refused"] + outcomes["503"] + outcomes["504"]
    return {
        "case": case.name,
        "what": case.what,
        "accepted": answered + lost,
        "answered": answered,
        "answered_200": outcomes["200"],
        "refused": refused,
        "lost": lost,
        "outcomes": dict(outcomes),
        "fault_request_status": injected[0] if injected and injected[0] is not None else None,
        "exit_code": exit_code,
        "may_lose": case.may_lose,
        "ok": (lost == 0 or case.may_lose) and exit_code == 0,
    }


def markdown(rows: list[dict[str, Any]], command: str, clients: int) -> str:
    lines = [
        "# Chaos: faults under load",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}, 2 cores, {clients} keep-alive httpx clients "
        "posting 80x80 PNGs back to back to a 64x64 six-convolution model (~20 ms an image); "
        "the fault two seconds in. Refused: 503/504 answers and refused connections. Lost: sent, "
        "never answered.",
        "",
        "| case | fault | accepted | answered (200) | refused | lost | other statuses | "
        "fault request | exit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        other = {
            k: v
            for k, v in row["outcomes"].items()
            if k not in ("200", "503", "504", "refused") and not k.startswith("lost")
        }
        lines.append(
            f"| {row['case']} | {row['what']} | {row['accepted']} | "
            f"{row['answered']} ({row['answered_200']}) | {row['refused']} | {row['lost']}"
            f"{' (in flight on the killed worker)' if row['may_lose'] and row['lost'] else ''} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(other.items())) or '-'} | "
            f"{row['fault_request_status'] or '-'} | {row['exit_code']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", help="run only these cases")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos")
    args = parser.parse_args(argv)
    chosen = [c for c in cases() if not args.case or c.name in args.case]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in chosen:
            rows.append(run_case(case, Path(folder), args.clients, args.seconds))
            print(json.dumps(rows[-1]), flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["PYTHONPATH=. .venv/bin/python -m benchmarks.chaos", *given])
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, command, args.clients))
    print(markdown(rows, command, args.clients))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
