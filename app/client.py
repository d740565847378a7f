"""Classify files and folders through a running server, a bounded number of requests at a time.

python -m app.client examples/ --url http://127.0.0.1:8000
python -m app.client photos/ a.jpg --url URL --top-k 3 --concurrency 8 --format jsonl -o out.jsonl
python -m app.client photos/ --url URL --model resnet50 --model-version 2
python -m app.client photos/ --url URL --trace      # one trace for the run (docs/tracing.md)
python -m app.client photos/ --url URL --embed photos.npz    # POST /embed (docs/embeddings.md)
python -m app.client photos/ --url URL --explain heatmaps/   # POST /explain

Folders are walked recursively for image files (by suffix); files named on the command line are
always sent, so the server says what is wrong with them. 503 answers are retried after the
server's Retry-After. Exit status: 0 if every image was answered, 1 if any failed (or the model
cannot answer --embed or --explain at all), 2 on bad usage.

--embed OUT.npz: one .npz, ``np.load(OUT)["embeddings"]`` float32 [N, F] and ``["paths"]`` str [N],
row i the embedding of paths[i], in the order the images were found; an image that failed is left
out of both (its row in the report says why). --explain DIR: each image's heatmap as
DIR/<its path under the folder named>/<stem>.heatmap.png (an RGBA PNG to lay over the image).
The report (CSV or JSON lines, one row per image, with the model version that answered it) is the
same in every mode.

Tracing: every request carries a W3C ``traceparent`` in the run's trace, a span of its own, when
``--trace`` is given (a new sampled trace, its id printed at the end) or ``TRACEPARENT`` is set (the
OpenTelemetry convention for handing a process its context: the run joins that trace).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import mimetypes
import os
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
from tqdm import tqdm

from core.preprocess import IMAGE_SUFFIXES

MAX_RETRY_WAIT_S = 60.0  # a Retry-After beyond this is capped, not obeyed blindly
CSV_FIELDS = [
    "path",
    "status",
    "model_version",
    "top1",
    "score",
    "predictions",
    "latency_ms",
    "attempts",
    "error",
]
HEATMAP_SUFFIX = ".heatmap.png"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})")


@dataclass
class Outcome:
    path: str
    status: int | None = None  # None: no HTTP answer (connection failed)
    model_version: str | None = None  # the version that answered (None: no answer)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float | None = None
    attempts: int = 0
    error: dict[str, str] | None = None
    traceparent: str | None = None  # what the last attempt sent (jsonl only)
    heatmap: str | None = None  # where its heatmap PNG was written (--explain)
    embedding: np.ndarray | None = field(default=None, repr=False)  # goes to --embed's file
    png: bytes | None = field(default=None, repr=False)  # the heatmap, until written

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "model_version": self.model_version,
            "predictions": self.predictions,
            "latency_ms": self.latency_ms,
            "attempts": self.attempts,
            "error": self.error,
            **({"traceparent": self.traceparent} if self.traceparent else {}),
            **({"heatmap": self.heatmap} if self.heatmap else {}),
        }

    def csv_row(self) -> dict[str, Any]:
        top = self.predictions[0] if self.predictions else {}
        error = f"{self.error['code']}: {self.error['message']}" if self.error else ""
        return {
            "path": self.path,
            "status": self.status if self.status is not None else "",
            "model_version": self.model_version or "",
            "top1": top.get("label", ""),
            "score": top.get("score", ""),
            "predictions": ";".join(f"{p['label']}:{p['score']:.6g}" for p in self.predictions),
            "latency_ms": self.latency_ms if self.latency_ms is not None else "",
            "attempts": self.attempts,
            "error": error,
            "heatmap": self.heatmap or "",
        }


@dataclass(frozen=True)
class Mode:
    """What the run asks of the server, and where the answers that are not rows go."""

    endpoint: str = "/predict"
    verb: str = "classifying"
    embeddings: Path | None = None  # --embed: the .npz
    heatmaps: Path | None = None  # --explain: the folder

    @classmethod
    def chosen(cls, args: argparse.Namespace) -> Mode:
        if args.embed:
            return cls("/embed", "embedding", embeddings=args.embed)
        if args.explain:
            return cls("/explain", "explaining", heatmaps=args.explain)
        return cls()


def find_images(
    paths: list[Path], skipped: Counter[str] | None = None
) -> Iterator[tuple[Path, Path]]:
    """Each image, and its path under the folder named that holds it (a file named: its name).
    ``skipped``: counts, by suffix, the files of the folders left out for not being images."""
    for path in paths:
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
            for other in (p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES):
                if skipped is not None:
                    skipped[other.suffix.lower() or "(none)"] += 1
            yield from sorted(
                (p, p.relative_to(path)) for p in files if p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            yield path, Path(path.name)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")


def heatmap_paths(found: list[tuple[Path, Path]], folder: Path) -> dict[Path, Path]:
    """Where each image's heatmap goes; raises ValueError where two images would share one."""
    chosen: dict[Path, Path] = {}
    sources: dict[Path, Path] = {}
    for path, relative in found:
        target = folder / relative.parent / (relative.stem + HEATMAP_SUFFIX)
        if sources.setdefault(target, path) != path:
            raise ValueError(f"{sources[target]} and {path} would both write {target}")
        chosen[path] = target
    return chosen


def retry_after_s(value: str | None, default: float = 1.0) -> float:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), MAX_RETRY_WAIT_S)


@dataclass(frozen=True)
class RunTrace:
    """The trace a run's requests join: its id, and its flags (01: sampled)."""

    trace_id: str
    flags: str

    @classmethod
    def chosen(cls, asked: bool) -> RunTrace | None:
        match = _TRACEPARENT.fullmatch(os.environ.get("TRACEPARENT", "").strip().lower())
        if match and int(match.group(1), 16):
            return cls(match.group(1), match.group(2))
        return cls(secrets.token_hex(16), "01") if asked else None

    def header(self) -> str:
        """A ``traceparent`` naming a new span of this trace: one per request."""
        return f"00-{self.trace_id}-{secrets.token_hex(8)}-{self.flags}"


async def classify(
    client: httpx.AsyncClient,
    path: Path,
    top_k: int | None,
    retries: int,
    trace: RunTrace | None = None,
    endpoint: str = "/predict",
) -> Outcome:
    outcome = Outcome(str(path))
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        outcome.error = {"code": "unreadable_file", "message": str(exc)}
        return outcome
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    params = {"top_k": top_k} if top_k else {}
    while True:
        outcome.attempts += 1
        started = time.perf_counter()
        headers = {}
        if trace is not None:
            headers["traceparent"] = outcome.traceparent = trace.header()
        try:
            files = {"file": (path.name, data, media_type)}
            response = await client.post(endpoint, files=files, params=params, headers=headers)
        except httpx.LocalProtocolError as exc:
            # The request itself cannot be sent (a header httpx refuses): sending it again
            # cannot help. Its message may hold a header's value, a key's: never shown.
            outcome.error = {"code": "request_not_sent", "message": type(exc).__name__}
            return outcome
        except httpx.TransportError as exc:
            outcome.error = {"code": "connection_failed", "message": _without_secrets(exc)}
            if outcome.attempts > retries:
                return outcome
            await asyncio.sleep(min(2.0 ** (outcome.attempts - 1), MAX_RETRY_WAIT_S))
            continue
        outcome.latency_ms = round((time.perf_counter() - started) * 1000, 2)
        outcome.status = response.status_code
        if response.status_code == 503 and outcome.attempts <= retries:
            await asyncio.sleep(retry_after_s(response.headers.get("retry-after")))
            continue
        return _read_answer(outcome, response)


def _without_secrets(exc: Exception) -> str:
    """What a connection failure says, with no request header in it (a key travels in one)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def read_key(path: Path) -> str:
    """The key in ``path``: a file holding the key alone, or a line of the server's own key
    file (``<key> name=<class> weight=<n>``, comments and blank lines allowed), of which the
    first key is used. Raises ValueError, never showing a key."""
    keys = []
    for line in path.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            keys.append(words[0])
    if not keys:
        raise ValueError(f"{path} holds no key")
    if len(keys) > 1:
        print(f"{path} holds {len(keys)} keys: using the first", file=sys.stderr)
    key = keys[0]
    if not key.isascii() or not key.isprintable():
        raise ValueError(f"{path}: the key is not printable ASCII, which a header cannot carry")
    return key


def _read_answer(outcome: Outcome, response: httpx.Response) -> Outcome:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        result = body["results"][0]
        outcome.model_version = body.get("model_version")
        outcome.predictions = result.get("predictions", [])
        if "embedding" in result:
            outcome.embedding = np.asarray(result["embedding"], dtype=np.float32)
        if "heatmap" in result:
            outcome.png = base64.b64decode(result["heatmap"]["png"])
        outcome.error = None
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):
        outcome.error = {"code": body["error"]["code"], "message": body["error"]["message"]}
    else:
        outcome.error = {"code": f"http_{response.status_code}", "message": response.text[:200]}
    return outcome


async def write_heatmap(outcome: Outcome, target: Path) -> None:
    """The answer's heatmap PNG to ``target``; a file that cannot be written fails the image."""
    assert outcome.png is not None
    try:
        await asyncio.to_thread(_write_bytes, target, outcome.png)
    except OSError as exc:
        outcome.error = {"code": "unwritable_heatmap", "message": str(exc)}
    else:
        outcome.heatmap = str(target)
    outcome.png = None


def _write_bytes(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def save_embeddings(out: Path, paths: list[Path], vectors: dict[int, np.ndarray]) -> None:
    """``vectors`` (by index into ``paths``) as --embed's .npz, in ``paths``' order: plain arrays,
    so ``np.load`` reads them without ``allow_pickle``. No vector at all: embeddings is [0, 0]."""
    order = sorted(vectors)
    names = np.array([str(paths[i]) for i in order], dtype=str)
    matrix = np.stack([vectors[i] for i in order]) if order else np.zeros((0, 0), np.float32)
    with open(out, "wb") as stream:  # a file object: savez appends no suffix of its own
        np.savez(stream, embeddings=matrix, paths=names)


@dataclass
class Tally:
    failed: int = 0
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)  # by index into the paths
    refused: dict[str, str] | None = None  # the model cannot answer this mode at all


class Writer:
    def __init__(self, stream: IO[str], fmt: str, heatmaps: bool = False) -> None:
        self.stream, self.fmt = stream, fmt
        fields = [*CSV_FIELDS, "heatmap"] if heatmaps else CSV_FIELDS
        self.csv = csv.DictWriter(stream, fields, extrasaction="ignore") if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, outcome: Outcome) -> None:
        if self.csv:
            self.csv.writerow(outcome.csv_row())
        else:
            self.stream.write(json.dumps(outcome.row()) + "\n")
        self.stream.flush()


async def run(
    args: argparse.Namespace,
    paths: list[Path],
    writer: Writer,
    trace: RunTrace | None = None,
    mode: Mode = Mode(),
    heatmaps: dict[Path, Path] | None = None,
) -> Tally:
    """Send every path with at most ``args.concurrency`` requests in flight. A model that cannot
    answer the mode at all (output_unavailable) stops the run: no image could succeed."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    pending = iter(enumerate(paths))
    tally = Tally()
    bar = tqdm(total=len(paths), unit="img", desc=mode.verb, file=sys.stderr, smoothing=0.1)
    # Sent with every request: which model, and which of its versions, answers.
    chosen = {"model": args.model, "version": args.model_version}
    params = {name: value for name, value in chosen.items() if value is not None}
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, params=params, limits=limits, timeout=args.timeout
    ) as client:

        async def worker() -> None:
            for index, path in pending:
                outcome = await classify(
                    client, path, args.top_k, args.retries, trace, mode.endpoint
                )
                if outcome.png is not None and heatmaps is not None:
                    await write_heatmap(outcome, heatmaps[path])
                if outcome.error is None and outcome.embedding is not None:
                    tally.embeddings[index] = outcome.embedding
                tally.failed += outcome.error is not None
                writer.write(outcome)
                bar.update()
                bar.set_postfix(failed=tally.failed, refresh=False)
                if outcome.error is not None and outcome.error["code"] == "output_unavailable":
                    tally.refused = outcome.error
                if tally.refused:
                    return

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    bar.close()
    return tally


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.client",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="images or folders")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--top-k", type=int, help="labels per image (default: the server's)")
    parser.add_argument("--model", help="the model to ask (default: the server's default)")
    parser.add_argument(
        "--model-version", help="the version of it to ask (default: its newest ready version)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the key: alone, or in the server's key-file format (the first key)",
    )
    parser.add_argument("--retries", type=int, default=5, help="retries on 503 / no connection")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--trace", action="store_true", help="send every request in one new sampled trace"
    )
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument(
        "--embed",
        type=Path,
        metavar="OUT.npz",
        help="ask /embed, and write the embeddings and their paths to OUT.npz",
    )
    instead.add_argument(
        "--explain",
        type=Path,
        metavar="DIR",
        help="ask /explain, and write each image's heatmap to DIR/<path>/<stem>.heatmap.png",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or (args.top_k is not None and args.top_k < 1):
        parser.error("need --concurrency >= 1, --retries >= 0 and --top-k >= 1")
    if args.embed:
        if args.embed.suffix != ".npz":
            parser.error(f"--embed writes an .npz (embeddings and paths), not {args.embed}")
        if not args.embed.parent.is_dir():
            parser.error(f"--embed: no folder {args.embed.parent} to write {args.embed.name} in")
        if args.top_k is not None:
            parser.error("--top-k: /embed answers no labels")
    args.api_key = None
    if args.api_key_file:
        try:
            args.api_key = read_key(args.api_key_file)
        except (OSError, ValueError) as exc:
            parser.error(f"--api-key-file: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = Mode.chosen(args)
    try:
        skipped: Counter[str] = Counter()
        found = list(find_images(args.paths, skipped))
        heatmaps = heatmap_paths(found, mode.heatmaps) if mode.heatmaps else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if skipped:
        each = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(skipped.items()))
        print(
            f"skipped {sum(skipped.values())} files that are not images by their suffix ({each}); "
            f"images are {' '.join(sorted(IMAGE_SUFFIXES))}",
            file=sys.stderr,
        )
    paths = [path for path, _ in found]
    if not paths:
        print(f"error: no image files in {' '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    trace = RunTrace.chosen(args.trace)
    with ExitStack() as stack:
        stream = sys.stdout
        if args.output:
            stream = stack.enter_context(open(args.output, "w", newline=""))
        writer = Writer(stream, args.format, heatmaps=heatmaps is not None)
        tally = asyncio.run(run(args, paths, writer, trace, mode, heatmaps))
    if tally.refused:
        print(f"error: {tally.refused['code']}: {tally.refused['message']}", file=sys.stderr)
        return 1
    if mode.embeddings:
        save_embeddings(mode.embeddings, paths, tally.embeddings)
    seconds = time.perf_counter() - started
    print(
        f"{len(paths)} images, {tally.failed} failed, {seconds:.1f} s "
        f"({len(paths) / seconds if seconds else 0:.1f} img/s)"
        + (f", trace {trace.trace_id}" if trace is not None else "")
        + (f", {len(tally.embeddings)} embeddings in {mode.embeddings}" if mode.embeddings else ""),
        file=sys.stderr,
    )
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
