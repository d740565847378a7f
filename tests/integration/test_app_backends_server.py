"""Backends: servers on each backend answer the same, and one asked for what the CPU or the file
cannot do exits with one line (tests/unit/test_app_backends.py: the choice itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.runtimes.registry import check_model
from core.errors import ModelError
from core.reference import BOUNDS
from tests.helpers.backends import HAS_BF16, ORT, OV, config_for, tiny_model, write_timings
from tests.helpers.models import LABELS, build_model, image_bytes, offline_top
from tests.helpers.server import message_is, post_image, run_server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("backends"))


@pytest.mark.parametrize("backend", ["openvino", "auto"])
def test_a_server_on_each_backend_answers_what_the_file_computes(tiny: Path, backend: str) -> None:
    with run_server(tiny, backend=backend) as server:
        if backend == "auto":
            server.wait_for_log(message_is("backend chosen"))
        server.wait_for_log(message_is("ready"))
        with httpx.Client(base_url=server.url) as client:
            described = client.get("/v1/models").json()["models"][0]
            runtime = described["backend"]
            # What serves is what was chosen (by auto: one runtime, or two for some batch sizes
            # each); on openvino, OpenVINO whatever its speed.
            chosen = [c for c in runtime["candidates"] if c["chosen"]]
            assert (runtime["name"], described["precision"]) == (
                "+".join(dict.fromkeys(c["backend"] for c in chosen)),
                "+".join(dict.fromkeys(c["precision"] for c in chosen)),
            )
            precisions = {c["precision"] for c in chosen}
            if backend == OV:
                assert runtime["name"] == OV
                assert precisions == {"bf16" if HAS_BF16 else "fp32"}
            else:
                assert precisions <= ({"fp32", "bf16"} if HAS_BF16 else {"fp32"})
            assert described["file_precision"] == "fp32"
            for seed in range(4):
                data = image_bytes(seed)
                (result,) = post_image(server.url, data, "x.png").json()["results"]
                assert_computes(tiny, data, result, precisions)
            metrics = client.get("/metrics").text
            assert f'backend="{runtime["name"]}"' in metrics


def test_a_server_serves_each_batch_size_on_the_runtime_timed_fastest_for_it(
    tiny: Path, tmp_path: Path
) -> None:
    # The timings a replica of this file on this CPU kept (the tuning cache): ONNX Runtime is
    # ahead for a lone image, OpenVINO for batches (fp32 both, so both to fp32's bound).
    write_timings(
        config_for(
            tiny,
            tuning_cache_dir=tmp_path,
            concurrent_batches=2,
            intra_op_threads=1,
            max_batch_size=8,
        ),
        {f"{ORT} fp32": {1: 1000.0, 8: 1000.0}, f"{OV} fp32": {1: 100.0, 8: 8000.0}},
    )
    with run_server(tiny, backend="auto", tuning_cache_dir=str(tmp_path)) as server:
        server.wait_for_log(message_is("backend timings reused"))
        server.wait_for_log(message_is("ready"))
        with httpx.Client(base_url=server.url) as client:
            described = client.get("/v1/models").json()["models"][0]
            runtime = described["backend"]
            serves = {c["backend"]: c["batch_sizes"] for c in runtime["candidates"] if c["chosen"]}
            assert (runtime["name"], described["precision"]) == (f"{ORT}+{OV}", "fp32")
            assert serves == {ORT: [1, 2, 3, 4, 5], OV: [6, 7, 8]}
            assert all(c["cached"] for c in runtime["candidates"] if c["images_per_s"] is not None)
            images = [image_bytes(seed) for seed in range(8)]
            # One image: a batch of 1, on ONNX Runtime; eight in one request: a batch of 8, on
            # OpenVINO. Each answers what the file computes, within fp32's bound.
            (lone,) = post_image(server.url, images[0], "x.png").json()["results"]
            assert_computes(tiny, images[0], lone, {"fp32"})
            files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
            answer = client.post("/predict", files=files, params={"top_k": 3}).json()
            for data, result in zip(images, answer["results"], strict=True):
                assert_computes(tiny, data, result, {"fp32"})
            assert f'backend="{ORT}+{OV}"' in client.get("/metrics").text


def assert_computes(tiny: Path, data: bytes, result: dict[str, Any], precisions: set[str]) -> None:
    """``result`` is what the file computes in fp32 for ``data``, within what the reference check
    allows the coarsest of ``precisions``: bf16 rounds each score by some 1e-3 and may reorder a
    near-tie below the top class, so it is held to the top class and the bound."""
    tolerance = max(BOUNDS[precision]["max_abs_diff"] for precision in precisions)
    got = [(p["class_id"], p["score"]) for p in result["predictions"]]
    want = offline_top(tiny, data, len(LABELS))
    ranked = len(got) if precisions == {"fp32"} else 1
    assert [c for c, _ in got][:ranked] == [c for c, _ in want][:ranked]
    every = dict(want)
    assert all(abs(score - every[c]) <= tolerance for c, score in got), (got, want)


def test_a_server_asked_for_what_the_cpu_cannot_do_exits_with_one_line(tiny: Path) -> None:
    setting = "bf16" if not HAS_BF16 else "fp16"  # fp16 on OpenVINO: refused on every CPU
    with run_server(tiny, backend="openvino", model_precision=setting) as server:
        line = server.wait_for_log(lambda e: "resnet-serve:" in str(e.get("message", "")))
        assert server.process.wait(timeout=60) == 1
    assert "openvino" in str(line["message"]) or "bf16" in str(line["message"])


def test_a_file_without_reference_outputs_is_refused_unless_the_check_is_off(
    tmp_path: Path,
) -> None:
    bare = build_model(tmp_path / "model.onnx", drop=("reference",))
    with pytest.raises(ModelError, match="has no reference outputs"):
        check_model(config_for(bare))  # what a supervisor checks
    with run_server(bare) as server:
        line = server.wait_for_log(lambda e: "resnet-serve:" in str(e.get("message", "")))
        assert server.process.wait(timeout=60) == 1
    assert "has no reference outputs" in str(line["message"])
    assert "RESNET_SERVE_REFERENCE_CHECK=false" in str(line["message"])
    with run_server(bare, reference_check="false") as server:
        warning = server.wait_for_log(message_is("serving without the reference check"))
        assert warning["level"] == "warning"
        server.wait_for_log(message_is("ready"))
        (result,) = post_image(server.url, image_bytes(3), "x.png").json()["results"]
        assert result["predictions"][0]["class_id"] == offline_top(bare, image_bytes(3), 1)[0][0]
