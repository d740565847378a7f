"""``python -m app.client`` as a real process against ``python -m app`` and a real 503-er."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import formatdate
from itertools import pairwise
from pathlib import Path
from time import time

import httpx
import pytest

from app.client import MAX_RETRY_WAIT_S, retry_after_s
from tests.helpers.server import ROOT, Server, free_port

EXAMPLES = sorted((ROOT / "examples").glob("digit-*.png"))


def run_client(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app.client", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def server_top1(url: str, path: Path) -> str:
    files = {"file": (path.name, path.read_bytes(), "image/png")}
    answer = httpx.post(f"{url}/predict", files=files, timeout=30).json()
    label: str = answer["results"][0]["predictions"][0]["label"]
    return label


def test_folder_with_a_broken_file_writes_one_json_line_per_image(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "scans"
    (folder / "nested").mkdir(parents=True)
    for index, path in enumerate(EXAMPLES):
        shutil.copy(path, folder / ("nested" if index % 2 else ".") / path.name)
    (folder / "broken.png").write_bytes(EXAMPLES[0].read_bytes()[:60])  # header, no pixels
    (folder / "notes.txt").write_text("not an image: skipped in folders")
    out = tmp_path / "out.jsonl"

    done = run_client(folder, "--url", server.url, "--format", "jsonl", "-o", out, "--top-k", "3")

    assert done.returncode == 1, done.stderr
    assert "11 images, 1 failed" in done.stderr
    assert "img/s" in done.stderr  # the progress bar's throughput
    rows = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {p.name for p in EXAMPLES} | {"broken.png"}
    broken = rows.pop("broken.png")
    assert broken["status"] == 422
    assert broken["error"]["code"] == "invalid_image"
    assert broken["predictions"] == []
    for path in EXAMPLES:
        row = rows[path.name]
        assert row["error"] is None
        assert row["status"] == 200
        assert len(row["predictions"]) == 3
        assert row["predictions"][0]["label"] == server_top1(server.url, path)
        assert row["latency_ms"] > 0
        assert row["attempts"] == 1


def test_csv_on_stdout_names_a_file_that_is_not_an_image(server: Server, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")

    done = run_client(EXAMPLES[3], text, "--url", server.url, "--concurrency", "1")

    assert done.returncode == 1, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [Path(row["path"]).name for row in rows] == [EXAMPLES[3].name, "notes.txt"]
    good, bad = rows
    assert good["top1"] == server_top1(server.url, EXAMPLES[3])
    assert good["error"] == ""
    assert len(good["predictions"].split(";")) == 5  # the server's default top_k
    assert bad["status"] == "415"
    assert bad["error"].startswith("unsupported_media_type: ")


def test_model_and_version_go_with_every_request(server: Server) -> None:
    served = run_client(
        EXAMPLES[3], "--url", server.url, "--model", "tiny-test", "--model-version", "7"
    )
    missing = run_client(
        EXAMPLES[3], "--url", server.url, "--model", "tiny-test", "--model-version", "9"
    )
    assert served.returncode == 0, served.stderr
    assert missing.returncode == 1
    (row,) = csv.DictReader(io.StringIO(missing.stdout))
    assert row["status"] == "404"
    assert "unknown version '9' of model 'tiny-test'" in row["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-folder"], "no such file or directory"),
        ([str(ROOT / "app" / "http" / "static")], "no image files"),
    ],
    ids=["missing", "no-images"],
)
def test_nothing_to_send_is_a_usage_error(args: list[str], message: str) -> None:
    done = run_client(*args, "--url", "http://127.0.0.1:9")
    assert done.returncode == 2
    assert message in done.stderr


@contextmanager
def flaky_server(refusals: str, retry_after: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "FLAKY_REFUSALS": refusals, "FLAKY_RETRY_AFTER": retry_after}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.helpers.flaky_server:app",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if "Uvicorn running" in line:
                break
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stderr.close()


def test_503_is_retried_after_the_servers_retry_after() -> None:
    with flaky_server(refusals="2", retry_after="1") as url:
        done = run_client(*EXAMPLES[:2], "--url", url, "--format", "jsonl", "--concurrency", "2")
        log = httpx.get(f"{url}/log").json()

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["attempts"] for row in rows] == [3, 3]
    assert all(row["status"] == 200 and row["error"] is None for row in rows)
    for path in EXAMPLES[:2]:
        times = [at for name, at in log if name == path.name]
        assert len(times) == 3
        # Lower bounds only: the client may wait longer on a busy machine, never shorter.
        assert all(later - earlier >= 0.95 for earlier, later in pairwise(times))


def test_gives_up_after_the_retries_with_the_servers_error() -> None:
    with flaky_server(refusals="always", retry_after="0") as url:
        done = run_client(EXAMPLES[0], "--url", url, "--format", "jsonl", "--retries", "2")

    assert done.returncode == 1
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["attempts"] == 3
    assert row["status"] == 503
    assert row["error"]["code"] == "overloaded"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 1.0),
        ("2", 2.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("bogus", 1.0),
        ("99999", MAX_RETRY_WAIT_S),
    ],
    ids=["absent", "seconds", "fraction", "negative", "bogus", "capped"],
)
def test_retry_after_header(header: str | None, seconds: float) -> None:
    assert retry_after_s(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    assert 5 <= retry_after_s(formatdate(time() + 10, usegmt=True)) <= 10
