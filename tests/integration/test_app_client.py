"""``python -m app.client`` as a real process against ``python -m app`` and a real 503-er."""

from __future__ import annotations

import base64
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
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.client import MAX_RETRY_WAIT_S, classify, retry_after_s
from tests.helpers.models import build_model, image_bytes
from tests.helpers.server import ROOT, Server, free_port, message_is, run_server

EXAMPLES = sorted((ROOT / "examples").glob("digit-*.png"))


def run_client(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app.client", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def server_top1(url: str, path: Path) -> str:
    files = {"file": (path.name, path.read_bytes(), "image/png")}
    answer = httpx.post(f"{url}/predict", files=files, timeout=30).json()
    label: str = answer["results"][0]["predictions"][0]["label"]
    return label


def server_result(url: str, endpoint: str, path: Path) -> dict[str, Any]:
    """``endpoint``'s answer for the one image at ``path``, asked directly."""
    files = {"file": (path.name, path.read_bytes(), "image/png")}
    response = httpx.post(f"{url}{endpoint}", files=files, timeout=30)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def scans(folder: Path) -> Path:
    """The examples, half in a subfolder, and a broken PNG (a header, no pixels)."""
    (folder / "nested").mkdir(parents=True)
    for index, path in enumerate(EXAMPLES):
        shutil.copy(path, folder / ("nested" if index % 2 else ".") / path.name)
    broken = folder / "broken.png"
    broken.write_bytes(EXAMPLES[0].read_bytes()[:60])
    return broken


def test_folder_with_a_broken_file_writes_one_json_line_per_image(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "scans"
    scans(folder)
    (folder / "notes.txt").write_text("not an image: skipped in folders")
    out = tmp_path / "out.jsonl"

    done = run_client(folder, "--url", server.url, "--format", "jsonl", "-o", out, "--top-k", "3")

    assert done.returncode == 1, done.stderr
    assert "11 images, 1 failed" in done.stderr
    assert "skipped 1 files that are not images by their suffix (.txt: 1)" in done.stderr
    assert "img/s" in done.stderr  # the progress bar's throughput
    rows = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {p.name for p in EXAMPLES} | {"broken.png"}
    broken = rows.pop("broken.png")
    assert broken["status"] == 422
    assert broken["error"]["code"] == "invalid_image"
    assert broken["predictions"] == []
    assert broken["model_version"] is None
    for path in EXAMPLES:
        row = rows[path.name]
        assert row["error"] is None
        assert row["status"] == 200
        assert row["model_version"] == "7"  # the version that answered: the tiny model's
        assert len(row["predictions"]) == 3
        assert row["predictions"][0]["label"] == server_top1(server.url, path)
        assert row["latency_ms"] > 0
        assert row["attempts"] == 1


KEYS = ("client-key-one-8d1f2a", "client-key-two-c07b55")


def test_the_servers_own_key_file_works_and_no_key_is_ever_shown(
    model_path: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\n{KEYS[0]} name=web\n{KEYS[1]} name=batch weight=2\n")
    with run_server(model_path, api_keys_file=str(keys)) as server:
        server.wait_for_log(message_is("ready"))
        done = run_client(*EXAMPLES[:3], "--url", server.url, "--api-key-file", keys)
        refused = run_client(EXAMPLES[0], "--url", server.url, "--retries", "3")

    assert done.returncode == 0, done.stderr
    assert "holds 2 keys: using the first" in done.stderr
    assert [row["status"] for row in csv.DictReader(io.StringIO(done.stdout))] == ["200"] * 3
    (row,) = csv.DictReader(io.StringIO(refused.stdout))
    assert (row["status"], row["attempts"]) == ("401", "1")  # a refusal is not retried
    for output in (done.stdout, done.stderr, refused.stdout, refused.stderr):
        assert not any(key in output for key in KEYS)


def test_a_key_no_header_can_carry_is_a_usage_error_that_does_not_show_it(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "key"
    keys.write_text("secret\x7fvalue-3e9a\n")
    done = run_client(EXAMPLES[0], "--url", "http://127.0.0.1:9", "--api-key-file", keys)
    assert done.returncode == 2
    assert "not printable ASCII" in done.stderr
    assert "secret" not in done.stderr + done.stdout


@pytest.mark.anyio
async def test_a_request_that_cannot_be_sent_is_not_retried(server: Server) -> None:
    # A header value with a line break: httpx refuses to send it, and the client must not
    # report a connection failure, retry it, or echo the header.
    header = {"Authorization": f"Bearer {KEYS[0]}\n{KEYS[1]}"}
    async with httpx.AsyncClient(base_url=server.url, headers=header) as client:
        outcome = await classify(client, EXAMPLES[0], None, retries=5)
    assert outcome.attempts == 1
    assert outcome.error is not None
    assert outcome.error["code"] == "request_not_sent"
    assert not any(key in str(outcome.error) for key in KEYS)


def test_csv_on_stdout_names_a_file_that_is_not_an_image(server: Server, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")

    done = run_client(EXAMPLES[3], text, "--url", server.url, "--concurrency", "1")

    assert done.returncode == 1, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [Path(row["path"]).name for row in rows] == [EXAMPLES[3].name, "notes.txt"]
    good, bad = rows
    assert good["top1"] == server_top1(server.url, EXAMPLES[3])
    assert good["model_version"] == "7"
    assert good["error"] == ""
    assert len(good["predictions"].split(";")) == 5  # the server's default top_k
    assert bad["status"] == "415"
    assert bad["model_version"] == ""
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


def test_embed_writes_each_answered_images_vector_beside_its_path(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "scans"
    broken = scans(folder)
    out, report = tmp_path / "vectors.npz", tmp_path / "out.jsonl"

    done = run_client(
        folder, "--url", server.url, "--embed", out, "--format", "jsonl", "-o", report
    )

    assert done.returncode == 1, done.stderr
    assert "11 images, 1 failed" in done.stderr
    assert "skipped" not in done.stderr  # every file in the folder is an image
    assert f"10 embeddings in {out}" in done.stderr
    rows = {row["path"]: row for row in map(json.loads, report.read_text().splitlines())}
    assert rows.pop(str(broken))["error"]["code"] == "invalid_image"
    assert all(row["status"] == 200 and row["error"] is None for row in rows.values())
    saved = np.load(out)  # no allow_pickle: plain arrays
    embeddings, paths = saved["embeddings"], saved["paths"]
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (10, 48)  # the tiny model's embedding: 48 features
    # The order the folder was walked in (sorted), the broken file left out.
    assert paths.tolist() == [str(p) for p in sorted(folder.rglob("*.png")) if p != broken]
    assert set(paths.tolist()) == set(rows)
    for path, vector in zip(paths, embeddings, strict=True):
        expected = server_result(server.url, "/embed", Path(path))["embedding"]
        np.testing.assert_allclose(vector, expected, rtol=1e-6, atol=1e-7)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5  # normalised, as /embed's default


def test_explain_writes_a_heatmap_per_image_where_its_path_says(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "scans"
    (folder / "nested").mkdir(parents=True)
    wide = folder / "nested" / "wide.png"
    wide.write_bytes(image_bytes(3, size=(80, 40)))
    shutil.copy(EXAMPLES[2], folder / EXAMPLES[2].name)
    heatmaps = tmp_path / "heatmaps"

    done = run_client(
        folder, EXAMPLES[5], "--url", server.url, "--explain", heatmaps, "--top-k", "10"
    )

    assert done.returncode == 0, done.stderr
    rows = {row["path"]: row for row in csv.DictReader(io.StringIO(done.stdout))}
    expected = {
        wide: heatmaps / "nested" / "wide.heatmap.png",
        folder / EXAMPLES[2].name: heatmaps / "digit-2.heatmap.png",
        EXAMPLES[5]: heatmaps / "digit-5.heatmap.png",  # a file named: by its name
    }
    assert sorted(p.relative_to(heatmaps) for p in heatmaps.rglob("*")) == sorted(
        [Path("nested"), *(p.relative_to(heatmaps) for p in expected.values())]
    )
    for path, written in expected.items():
        row = rows[str(path)]
        assert row["heatmap"] == str(written)
        answer = server_result(server.url, "/explain?top_k=10", path)
        assert row["predictions"] == ";".join(
            f"{p['label']}:{p['score']:.6g}" for p in answer["predictions"]
        )
        declared = answer["heatmap"]
        with Image.open(written) as png, Image.open(path) as image:
            assert png.format == "PNG"
            # A palette PNG whose colours carry alpha: RGBA once decoded.
            assert png.size == (declared["width"], declared["height"])
            assert png.size == image.size
            pixels = np.asarray(png.convert("RGBA"))
        with Image.open(io.BytesIO(base64.b64decode(declared["png"]))) as served:
            np.testing.assert_array_equal(pixels, np.asarray(served.convert("RGBA")))


def test_a_model_without_the_outputs_is_one_clear_error(tmp_path: Path) -> None:
    old = build_model(tmp_path / "old.onnx", extras=False)
    out, heatmaps = tmp_path / "vectors.npz", tmp_path / "heatmaps"
    with run_server(old) as server:
        server.wait_for_log(message_is("ready"))
        embedded = run_client(*EXAMPLES, "--url", server.url, "--embed", out)
        explained = run_client(*EXAMPLES, "--url", server.url, "--explain", heatmaps)

    for done, output in ((embedded, "'embedding'"), (explained, "'class_map'")):
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: output_unavailable: "), done.stderr
        assert output in last
        assert "re-export" in last
        assert "Traceback" not in done.stderr
    # Stopped at the first refusal: at most one request per connection went out.
    assert len(list(csv.DictReader(io.StringIO(embedded.stdout)))) <= 4
    assert not out.exists()
    assert not heatmaps.exists()


def test_two_images_that_would_share_a_heatmap_are_a_usage_error(tmp_path: Path) -> None:
    for name in ("a.png", "a.jpg"):
        shutil.copy(EXAMPLES[0], tmp_path / name)
    done = run_client(tmp_path, "--url", "http://127.0.0.1:9", "--explain", tmp_path / "maps")
    assert done.returncode == 2
    assert "would both write" in done.stderr
    assert "a.heatmap.png" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-folder"], "no such file or directory"),
        ([str(ROOT / "app" / "http" / "static")], "no image files"),
        (["examples", "--embed", "out.npy"], "--embed writes an .npz"),
        (["examples", "--embed", "missing-folder/out.npz"], "no folder missing-folder"),
        (["examples", "--embed", "out.npz", "--top-k", "3"], "/embed answers no labels"),
        (["examples", "--embed", "out.npz", "--explain", "maps"], "not allowed with"),
    ],
    ids=["missing", "no-images", "embed-suffix", "embed-folder", "embed-top-k", "both"],
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
    assert all(row["model_version"] == "1" for row in rows)  # the answer's, not the 503s'
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
