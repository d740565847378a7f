"""Backends: servers on each backend answer the same, and one asked for what the CPU or the file
cannot do exits with one line (tests/unit/test_app_backends.py: the choice itself)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.runtimes.registry import check_model
from core.errors import ModelError
from core.reference import BOUNDS
from tests.helpers.backends import HAS_BF16, OV, config_for, tiny_model
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
            (chosen,) = [c for c in runtime["candidates"] if c["chosen"]]
            # What serves is what was chosen: on openvino, OpenVINO whatever its speed.
            assert (runtime["name"], described["precision"]) == (
                chosen["backend"],
                chosen["precision"],
            )
            if backend == OV:
                assert runtime["name"] == OV
                assert described["precision"] == ("bf16" if HAS_BF16 else "fp32")
            else:
                assert described["precision"] in (("fp32", "bf16") if HAS_BF16 else ("fp32",))
            assert described["file_precision"] == "fp32"
            # What the file computes in fp32, within what the reference check allows this
            # precision: bf16 rounds each score by some 1e-3 and may reorder a near-tie below the
            # top class, so it is held to the top class and the bound.
            tolerance = BOUNDS[described["precision"]]["max_abs_diff"]
            for seed in range(4):
                data = image_bytes(seed)
                (result,) = post_image(server.url, data, "x.png").json()["results"]
                got = [(p["class_id"], p["score"]) for p in result["predictions"]]
                want = offline_top(tiny, data, len(LABELS))
                ranked = len(got) if described["precision"] == "fp32" else 1
                assert [c for c, _ in got][:ranked] == [c for c, _ in want][:ranked]
                every = dict(want)
                assert all(abs(score - every[c]) <= tolerance for c, score in got), (got, want)
            metrics = client.get("/metrics").text
            assert f'backend="{runtime["name"]}"' in metrics


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
        check_model(config_for(bare))  # type: ignore[arg-type]  # what a supervisor checks
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
