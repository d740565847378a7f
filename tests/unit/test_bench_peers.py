"""The peer benchmark's own logic: load-point accounting, the table, and the shared classifier
the peers run (same session options and same answers as app/). Reading a running server:
tests/integration/test_bench_peers_server.py."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.repository.configs import intra_op_threads, runtime_config
from app.runtimes.onnxruntime import OnnxModel
from app.settings import Settings
from benchmarks.peers.common import Classifier
from benchmarks.peers.drive import (
    MULTIPART,
    Load,
    Measured,
    form,
    pooled,
    retry_after,
    top5,
    window_seconds,
)
from benchmarks.peers.report import (
    Outcome,
    agreement,
    cpu_seconds,
    markdown,
    status_mix,
    summarize,
)
from benchmarks.peers.run import merged
from tests.helpers.models import image_bytes


def test_summarize_counts_only_requests_finished_inside_the_window() -> None:
    outcomes = [
        Outcome(0.0, 0.5, "200"),  # warm-up: finished before the window
        Outcome(0.9, 1.1, "200"),  # 200 ms
        Outcome(1.0, 1.4, "200"),  # 400 ms
        Outcome(1.5, 1.6, "503"),
        Outcome(2.0, 2.5, "ServerDisconnectedError"),
        Outcome(2.5, 3.0, "200"),  # drain: finished at the window's end
    ]
    point = summarize(outcomes, window=(1.0, 3.0))
    assert point["images_per_s"] == pytest.approx(1.0)
    assert point["p50_ms"] == pytest.approx(300.0)
    assert point["p99_ms"] == pytest.approx(398.0)
    assert point["statuses"] == {"200": 2, "503": 1, "ServerDisconnectedError": 1}


def test_summarize_without_successes_has_no_percentiles() -> None:
    point = summarize([Outcome(1.0, 1.2, "503")], window=(1.0, 2.0))
    assert point["images_per_s"] == 0.0
    assert point["p50_ms"] is None
    assert point["p99_ms"] is None
    assert point["statuses"] == {"503": 1}


def test_cpu_seconds_counts_new_processes_in_full_and_old_ones_by_difference() -> None:
    before = {10: 5.0, 11: 1.0, 12: 3.0}  # 12 exits in between
    after = {10: 6.5, 11: 1.0, 13: 0.25}  # 13 is born in between
    assert cpu_seconds(before, after) == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("statuses", "text"),
    [
        ({"200": 97, "503": 3}, "200 97%, 503 3%"),
        ({"503": 1, "200": 1, "TimeoutError": 2}, "TimeoutError 50%, 200 25%, 503 25%"),
        ({}, "none finished"),
    ],
    ids=["ranked", "ties-by-name", "empty"],
)
def test_status_mix(statuses: dict[str, int], text: str) -> None:
    assert status_mix(statuses) == text


def test_agreement_compares_top1_and_the_whole_top5_with_ours() -> None:
    ours = [[3, 1, 2, 0, 4], [7, 1, 2, 0, 4], [5, 6, 1, 2, 3]]
    peer = [[3, 1, 2, 0, 4], [7, 2, 1, 0, 4], [6, 5, 1, 2, 3]]
    assert agreement(peer, ours) == "top-1 2/3, top-5 1/3"
    assert agreement(peer, None) == "no reference (ours not run)"


@pytest.mark.parametrize(
    ("header", "pause"),
    [("1", 1.0), ("0.5", 0.5), ("120", 5.0), (None, 0.1), ("Wed, 21 Oct 2026 07:28:00 GMT", 0.1)],
    ids=["seconds", "fraction", "capped", "absent", "http-date"],
)
def test_clients_wait_as_retry_after_says(header: str | None, pause: float) -> None:
    assert retry_after(header, Load(backoff_s=0.1, max_retry_after_s=5.0)) == pause


PREDICTIONS = {"predictions": [{"class_id": c, "label": str(c)} for c in (4, 2, 9, 1, 0, 7)]}


@pytest.mark.parametrize(
    "body",
    [{"results": [{"filename": "a.jpg", **PREDICTIONS}]}, PREDICTIONS, [PREDICTIONS]],
    ids=["ours", "peer", "bentoml-batch-slice"],
)
def test_top5_reads_every_servers_answer(body: object) -> None:
    assert top5(body) == [4, 2, 9, 1, 0]


def test_markdown_has_one_table_per_model_and_the_agreement_line() -> None:
    point = {
        "concurrency": 16,
        "steady": True,
        "images_per_s": 24.04,
        "p50_ms": 640.4,
        "p95_ms": 700.0,
        "p99_ms": None,
        "statuses": {"200": 9, "503": 1},
        "server_cpu_percent": 190.2,
        "server_cpu_ms_per_request": 79.25,
        "peak_rss_mib": 512.6,
        "peak_pss_mib": 400.1,
    }
    runs: list[dict[str, Any]] = [
        {
            "server": s,
            "model": m,
            "startup_s": 2.04,
            "agreement": "top-1 18/18, top-5 17/18",
            "points": [point],
        }
        for m in ("fp32", "int8")
        for s in ("ours", "litserve")
    ]
    runs[0]["served_by"] = ["onnxruntime fp32", "openvino fp32"]
    text = markdown({"runs": runs})
    assert text.count("Ours served on") == 1  # the int8 run's record has none
    assert (
        "Ours served on (each start, as its /v1/models says): onnxruntime fp32, openvino fp32"
        in text
    )
    assert text.count("| server | start-up s |") == 2
    assert "## fp32" in text
    assert "## int8" in text
    row = (
        "| litserve | 2.0 | 16 | 24.0 | 640 | 700 | - | 200 90%, 503 10% | 190 | 79.2 | 513 | 400 |"
    )
    assert text.count(row) == 2
    assert "equal to ours on the check images: litserve top-1 18/18, top-5 17/18" in text
    assert "not steady" not in text
    unsteady = markdown({"runs": [runs[1] | {"points": [point | {"steady": False}]}]})
    assert "| litserve | 2.0 | 16\\* |" in unsteady
    assert "\\* measured before every client had had an answer" in unsteady


def _ours(model_path: Path) -> OnnxModel:
    return OnnxModel.load(runtime_config(Settings(model_path=model_path)))


def test_peer_classifier_opens_the_session_as_the_server_does(model_path: Path) -> None:
    ours = _ours(model_path)._session.get_session_options()
    peers = Classifier(model_path).session.get_session_options()
    for option in ("inter_op_num_threads", "graph_optimization_level"):
        assert getattr(peers, option) == getattr(ours, option), option
    assert peers.intra_op_num_threads == 0  # ONNX Runtime's own choice, as by hand
    assert ours.intra_op_num_threads == intra_op_threads(Settings(model_path=model_path))


def test_peer_classifier_answers_as_the_server_does(model_path: Path) -> None:
    model, peer = _ours(model_path), Classifier(model_path)
    crops = np.stack([peer.decode(image_bytes(seed)) for seed in range(6)])
    answers = [peer.answer(row) for row in peer.predict(crops)]
    expected = model.predict(crops).argmax(axis=1)
    assert [a["predictions"][0]["class_id"] for a in answers] == expected.tolist()
    assert len({a["predictions"][0]["label"] for a in answers}) > 1  # the images differ
    assert all(len(a["predictions"]) == 5 for a in answers)


def test_markdown_shows_a_failed_server_and_leaves_it_out_of_the_agreement() -> None:
    runs = [
        {"server": "ours", "model": "fp32", "startup_s": 2.0, "agreement": "x", "points": []},
        {"server": "rayserve", "model": "fp32", "error": "RuntimeError: exited\ntraceback"},
    ]
    text = markdown({"runs": runs})
    assert "| rayserve | failed: RuntimeError: exited |" in text
    assert "Answers equal to ours on the check images: no peers\n" in text


def test_rounds_pool_into_one_point_over_their_summed_seconds() -> None:
    def window(start: float, latencies: list[float], statuses: list[str]) -> Measured:
        outcomes = [
            Outcome(start + i - latency, start + i + 0.5, status)
            for i, (latency, status) in enumerate(zip(latencies, statuses, strict=True))
        ]
        return Measured(16, start, 3.0, True, outcomes, 4.0, 2.0, 0.1, 300.0, None)

    point = pooled(
        [window(100.0, [0.1, 0.2, 0.3], ["200"] * 3), window(500.0, [0.9, 0.4], ["200", "503"])]
    )
    assert point["rounds"] == 2
    assert point["images_per_s"] == 4 / 8  # four 200s in two windows of 4 s
    assert point["statuses"] == {"200": 4, "503": 1}
    assert point["server_cpu_percent"] == 50.0
    # The 200s took 0.6, 0.7, 0.8 and 1.4 s: percentiles over both windows together.
    assert point["p50_ms"] is not None
    assert 700 <= point["p50_ms"] <= 800
    assert point["peak_rss_mib"] == 300.0


def test_passes_merge_into_one_run_with_each_point_pooled_over_them() -> None:
    def window(clients: int, start: float, answers: int) -> Measured:
        step = 2.0 / answers  # all finished inside the 2 s window
        outcomes = [
            Outcome(start + i * step, start + (i + 0.5) * step, "200") for i in range(answers)
        ]
        return Measured(clients, start, 3.0, True, outcomes, 2.0, 1.0, 0.1, 100.0, None)

    first = {"server": "ours", "startup_s": 5.0, "top5": [[1]], "windows": {}}
    first["served_by"] = "onnxruntime fp32"
    first["windows"] = {1: [window(1, 0.0, 10)], 16: [window(16, 10.0, 20)]}
    second = {"server": "ours", "startup_s": 6.0, "top5": [[1]], "windows": {}}
    second["served_by"] = "openvino fp32"
    second["windows"] = {1: [window(1, 50.0, 30)], 16: [window(16, 60.0, 20)]}
    run = merged([first, second])
    assert [p["concurrency"] for p in run["points"]] == [1, 16]
    assert [p["rounds"] for p in run["points"]] == [2, 2]
    assert run["points"][0]["images_per_s"] == 40 / 4  # 10 + 30 answers in two windows of 2 s
    assert (run["startup_s"], run["startups_s"]) == (5.0, [5.0, 6.0])
    assert run["served_by"] == ["onnxruntime fp32", "openvino fp32"]  # what each start chose
    assert "windows" not in run
    failed = {"server": "ours", "error": "RuntimeError: no answer"}
    assert merged([first, failed]) == failed


@pytest.mark.parametrize(
    ("answers", "min_answers", "seconds"),
    [
        (30, 0, 12.0),  # no target: the window as given
        (30, 600, 48.0),  # 10 a second: 600 need 60 s, capped at 4 x 12
        (90, 600, 20.0),  # 30 a second: 20 s hold 600
        (600, 600, 12.0),  # fast enough: never shorter than given
        (0, 600, 12.0),  # nothing answered yet: no rate to go by
    ],
)
def test_a_window_stretches_to_hold_min_answers_at_the_warm_up_rate(
    answers: int, min_answers: int, seconds: float
) -> None:
    warmup = [Outcome(0.0, 1.0, "200")] * answers + [Outcome(0.0, 1.0, "503")] * 50
    load = Load(seconds=12.0, min_answers=min_answers)
    assert window_seconds(load, warmup, warmup_s=3.0) == seconds


def test_the_load_sends_one_multipart_image_field_encoded_once() -> None:
    image = image_bytes(3)
    header = "".join(f"{k}: {v}\r\n" for k, v in MULTIPART.items()).encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(
        header + b"\r\n" + form(image, "p.jpg", "image/jpeg")
    )
    (part,) = message.iter_parts()
    assert part.get_param("name", header="content-disposition") == "image"
    assert part.get_filename() == "p.jpg"
    assert part.get_content_type() == "image/jpeg"
    assert part.get_payload(decode=True) == image
