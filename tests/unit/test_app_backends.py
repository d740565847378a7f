"""Backends: which runtime and precision the settings choose (a pure function), OpenVINO itself on
real files and ``auto``'s timed choice (tests/integration/test_app_backends_server.py: servers on
each backend answering the same)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.runtimes import openvino
from app.runtimes.base import Backend
from app.runtimes.onnxruntime import OnnxModel
from app.runtimes.openvino import OpenVinoModel
from app.runtimes.registry import (
    Candidate,
    _ranked,
    _serves,
    _speed,
    candidates,
    check_model,
    open_model,
    peak_copies,
)
from app.runtimes.split import SplitModel
from core.errors import ModelError
from core.reference import BOUNDS, PROBE
from tests.helpers.backends import HAS_BF16, ORT, OV, config_for, tiny_model, write_timings
from tests.helpers.models import CROP_SIZE, LABELS, build_model

NO_BF16 = "this CPU has no bf16"


def choose(backend: str, precision: str, **kwargs: object) -> tuple[list[str], list[str]]:
    options: dict[str, object] = {"gpu": False, "bf16_allowed": True, "bf16_reason": None}
    tried, skipped = candidates(backend, precision, **(options | kwargs))  # type: ignore[arg-type]
    return [str(c) for c in tried], [f"{c}: {why}" for c, why in skipped]


@pytest.mark.parametrize(
    ("backend", "precision", "kwargs", "tried", "skipped"),
    [
        ("auto", "auto", {}, ["onnxruntime fp32", "openvino fp32", "openvino bf16"], []),
        (
            "auto",
            "auto",
            {"bf16_reason": NO_BF16},
            ["onnxruntime fp32", "openvino fp32"],
            [f"openvino bf16: {NO_BF16}"],
        ),
        (
            "auto",
            "auto",
            {"bf16_allowed": False},
            ["onnxruntime fp32", "openvino fp32"],
            ["openvino bf16: bf16 is off (RESNET_SERVE_BF16=false)"],
        ),
        ("auto", "fp32", {}, ["onnxruntime fp32", "openvino fp32"], []),
        ("auto", "int8", {}, ["onnxruntime int8", "openvino int8"], []),
        ("auto", "fp16", {}, ["onnxruntime fp16"], []),
        ("auto", "bf16", {}, ["openvino bf16"], []),
        ("auto", "auto", {"gpu": True}, ["onnxruntime auto"], []),
        ("onnxruntime", "auto", {}, ["onnxruntime auto"], []),
        ("openvino", "auto", {}, ["openvino bf16"], []),
        ("openvino", "auto", {"bf16_reason": NO_BF16}, ["openvino fp32"], []),
        ("openvino", "auto", {"bf16_allowed": False}, ["openvino fp32"], []),
        ("openvino", "int8", {}, ["openvino int8"], []),
    ],
    ids=[
        "auto-tries-all-fp32-grade",
        "auto-skips-bf16-without-it",
        "auto-skips-bf16-when-off",
        "pinned-fp32-is-never-bf16",
        "int8-on-both",
        "fp16-is-onnxruntime",
        "bf16-is-openvino",
        "gpu-is-onnxruntime",
        "onnxruntime-alone",
        "openvino-takes-bf16-where-it-can",
        "openvino-fp32-without-bf16",
        "openvino-fp32-when-off",
        "openvino-int8",
    ],
)
def test_candidates(
    backend: str, precision: str, kwargs: dict[str, object], tried: list[str], skipped: list[str]
) -> None:
    assert choose(backend, precision, **kwargs) == (tried, skipped)


@pytest.mark.parametrize(
    ("backend", "precision", "gpu", "match"),
    [
        ("onnxruntime", "bf16", False, "computed by OpenVINO"),
        ("auto", "bf16", True, "computed by OpenVINO"),
        ("openvino", "auto", True, "providers setting plans a GPU"),
        ("openvino", "fp16", False, "fp16 files are for GPUs"),
    ],
)
def test_settings_no_backend_can_serve_are_one_line(
    backend: str, precision: str, gpu: bool, match: str
) -> None:
    with pytest.raises(ModelError, match=match):
        candidates(backend, precision, gpu=gpu, bf16_allowed=True, bf16_reason=None)


def test_candidates_print_as_the_logs_name_them() -> None:
    assert str(Candidate(OV, "bf16")) == "openvino bf16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("backends"))


def test_openvino_computes_what_onnx_runtime_does(tiny: Path) -> None:
    model = OpenVinoModel.load(tiny, "fp32", lanes=1, threads=1)
    assert (model.backend, model.provider, model.precision) == (OV, "OpenVINO CPU", "fp32")
    assert model.metadata.name == "tiny-test"  # read from the file's metadata by OpenVINO
    images = np.random.default_rng(1).integers(0, 256, (5, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    session = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"images": images})
    got = model.predict(images)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5
    model.self_check(4)  # the reference probes, on OpenVINO


def test_each_lane_infers_on_its_own_request(tiny: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = OpenVinoModel.load(tiny, "fp32", lanes=2, threads=2)
    images = [np.full((3, CROP_SIZE, CROP_SIZE, 3), value, np.uint8) for value in (0, 90, 255)]
    expected = [model.predict(batch) for batch in images]
    with ThreadPoolExecutor(2) as lanes:
        for _ in range(5):
            answers = list(lanes.map(model.predict, images))
            for got, want in zip(answers, expected, strict=True):
                assert np.array_equal(got, want)  # a lane never reads another's output


def test_bf16_is_computed_where_the_cpu_has_it_and_refused_where_not(tiny: Path) -> None:
    fp32 = OpenVinoModel.load(tiny, "fp32", lanes=1, threads=1)
    assert openvino.computed_precision(fp32._compiled) == "f32"  # what load compares bf16 with
    if HAS_BF16:
        model = OpenVinoModel.load(tiny, "bf16", lanes=1, threads=1)
        assert model.precision == "bf16"
        assert openvino.computed_precision(model._compiled) == "bf16"
        model.self_check(2)
    else:
        with pytest.raises(ModelError, match="model_precision=bf16: this CPU has no bf16"):
            OpenVinoModel.load(tiny, "bf16", lanes=1, threads=1)


def test_openvino_refuses_a_file_that_breaks_the_contract(tmp_path: Path) -> None:
    eleven = {"num_classes": "11", "labels": json.dumps([*LABELS, "ten"])}
    wrong = build_model(tmp_path / "model.onnx", metadata=eleven)
    with pytest.raises(ModelError, match="output 'probabilities' must be"):
        OpenVinoModel.load(wrong, "fp32", lanes=1, threads=1)
    with pytest.raises(ModelError, match="model file not found"):
        OpenVinoModel.load(tmp_path / "missing.onnx", "fp32", lanes=1, threads=1)


def test_auto_times_every_candidate_at_the_smallest_and_largest_batch(tiny: Path) -> None:
    model = open_model(config_for(tiny, tuning="off"))
    entries = {(e["backend"], e["precision"]): e for e in model.choice}
    for candidate in ((ORT, "fp32"), (OV, "fp32")):
        assert set(entries[candidate]["images_per_s_by_batch"]) == {1, 8}
        assert entries[candidate]["cached"] is False
    bf16 = entries[(OV, "bf16")]
    assert (bf16.get("images_per_s", 0) > 0) if HAS_BF16 else (NO_BF16 in bf16["skipped"])
    chosen = [e for e in model.choice if e["chosen"]]
    # Every bucket is served, once: by one runtime, or by two (each for some sizes).
    assert sorted(size for e in chosen for size in e["batch_sizes"]) == list(range(1, 9))
    assert isinstance(model, SplitModel) == (len(chosen) == 2)
    assert model.backend == "+".join(dict.fromkeys(e["backend"] for e in chosen))
    (largest,) = [e for e in chosen if 8 in e["batch_sizes"]]
    onnxruntime = entries[(ORT, "fp32")]["images_per_s_by_batch"][8]
    timed = [e for e in model.choice if "images_per_s" in e]
    if largest["backend"] == OV:  # another runtime replaces ONNX Runtime only 10% faster
        assert largest["images_per_s_by_batch"][8] >= onnxruntime * 1.1
    else:
        assert max(e["images_per_s_by_batch"][8] for e in timed) < onnxruntime * 1.1
    model.close()


# ONNX Runtime ahead for a lone image, OpenVINO for full batches (the digits demo on a CPU with
# bf16, in fp32 here so that both compute to fp32's bound): with a batch's seconds affine between
# the two sizes timed, ONNX Runtime keeps 1-5 (OpenVINO is not 10% faster there) and OpenVINO
# takes 6-8.
ORT_FP32, OV_FP32 = f"{ORT} fp32", f"{OV} fp32"
SPLIT = {ORT_FP32: {1: 1000.0, 8: 1000.0}, OV_FP32: {1: 100.0, 8: 8000.0}}
BUCKETS = tuple(range(1, 9))


def test_each_bucket_goes_to_the_runtime_preferred_at_its_size() -> None:
    ort_fp32, ov_fp32 = Candidate(ORT, "fp32"), Candidate(OV, "fp32")
    speeds = {ort_fp32: SPLIT[ORT_FP32], ov_fp32: SPLIT[OV_FP32]}
    serves = _serves(speeds, BUCKETS, ov_fp32, ort_fp32)
    assert [str(serves[size]) for size in BUCKETS] == [ORT_FP32] * 5 + [OV_FP32] * 3
    assert _speed(SPLIT[OV_FP32], 5) == pytest.approx(5 / (1 / 100 + (8 / 8000 - 1 / 100) * 4 / 7))
    assert _speed(SPLIT[OV_FP32], 16) == 8000  # past the sizes timed: per image as at the largest
    # Within 10% of ONNX Runtime at every size: ONNX Runtime keeps them all.
    close = {ort_fp32: {1: 1000.0, 8: 1000.0}, ov_fp32: {1: 1050.0, 8: 1090.0}}
    assert set(_serves(close, BUCKETS, ov_fp32, ort_fp32).values()) == {ort_fp32}


def test_auto_serves_each_bucket_on_the_runtime_fastest_for_it(tiny: Path, tmp_path: Path) -> None:
    config = config_for(tiny, tuning_cache_dir=tmp_path)
    write_timings(config, SPLIT)
    model = open_model(config)
    assert isinstance(model, SplitModel)
    assert (model.backend, model.precision) == (f"{ORT}+{OV}", "fp32")
    chosen = {
        f"{e['backend']} {e['precision']}": e["batch_sizes"] for e in model.choice if e["chosen"]
    }
    assert chosen == {ORT_FP32: [1, 2, 3, 4, 5], OV_FP32: [6, 7, 8]}
    assert all(e["cached"] for e in model.choice if "images_per_s" in e)
    model.bind(BUCKETS)
    assert (model.part(1).backend, model.part(8).backend) == (ORT, OV)
    model.warm_up(BUCKETS)
    model.warm_up_alone(BUCKETS)
    model.self_check(2)  # each part's rows and the file's reference outputs, on its own buckets
    images = np.random.default_rng(2).integers(0, 256, (8, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    session = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"images": images})
    bound = BOUNDS["fp32"]["max_abs_diff"]
    alone = np.concatenate([model.predict(images[i : i + 1]) for i in range(8)])  # ONNX Runtime
    lone = model.run_alone(images[:1])["probabilities"]  # its spinning session (adaptive)
    batched = model.predict(images)  # OpenVINO
    assert np.abs(alone - expected).max() <= bound
    assert np.abs(lone - expected[:1]).max() <= bound
    assert np.abs(batched - expected).max() <= bound
    model.close()


def test_one_runtime_fastest_at_every_size_serves_alone(tiny: Path, tmp_path: Path) -> None:
    config = config_for(tiny, tuning_cache_dir=tmp_path)
    write_timings(config, {ORT_FP32: {1: 1000.0, 8: 8000.0}, OV_FP32: {1: 500.0, 8: 7500.0}})
    model = open_model(config)
    assert isinstance(model, OnnxModel)  # no split: served exactly as by ONNX Runtime alone
    (chosen,) = [e for e in model.choice if e["chosen"]]
    assert (chosen["backend"], chosen["batch_sizes"]) == (ORT, list(BUCKETS))


def test_a_second_runtime_over_the_memory_budget_is_not_opened_and_says_why(
    tiny: Path, tmp_path: Path
) -> None:
    config = config_for(tiny, tuning_cache_dir=tmp_path)
    write_timings(config, SPLIT)
    model = open_model(config, budget_mib=1)  # this process holds more than 1 MiB already
    assert isinstance(model, OpenVinoModel)  # the largest batch's runtime serves every size
    entries = {f"{e['backend']} {e['precision']}": e for e in model.choice}
    assert entries[OV_FP32]["batch_sizes"] == list(BUCKETS)
    refused = entries[ORT_FP32]
    assert not refused["chosen"]
    assert refused["skipped"].startswith("fastest for batches of 1-5, not opened beside openvino")
    assert "over memory_budget_mib=1" in refused["skipped"]


def test_preference_keeps_onnx_runtime_first_unless_another_is_10_percent_faster() -> None:
    ort_fp32, ov_fp32, ov_bf16 = (
        Candidate(ORT, "fp32"),
        Candidate(OV, "fp32"),
        Candidate(OV, "bf16"),
    )
    assert _ranked({ort_fp32: 10, ov_fp32: 10.9, ov_bf16: 10.5}) == [ort_fp32, ov_fp32, ov_bf16]
    assert _ranked({ort_fp32: 10, ov_fp32: 11.5, ov_bf16: 20}) == [ov_bf16, ov_fp32, ort_fp32]
    assert _ranked({ort_fp32: 10, ov_fp32: 12, ov_bf16: 10.5}) == [ov_fp32, ort_fp32, ov_bf16]
    assert _ranked({ov_fp32: 3, ov_bf16: 5}) == [ov_bf16, ov_fp32]  # ONNX Runtime's rows failed


@pytest.mark.parametrize(
    ("timings", "checked"),
    [
        ({ORT_FP32: {1: 1000.0, 8: 1000.0}}, [ORT, OV]),
        (SPLIT, [OV, ORT]),
    ],
    ids=["onnxruntime-preferred-everywhere", "onnxruntime-preferred-for-a-lone-image"],
)
def test_auto_checks_references_in_order_of_preference_and_falls_back(
    tiny: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    timings: dict[str, dict[int, float]],
    checked: list[str],
) -> None:
    # ONNX Runtime's reference check is made to fail (the real one of every other candidate
    # runs): auto must serve the next candidate at every size, and check none behind the one
    # that passes (nor OpenVINO bf16, where the CPU has it: it is timed slowest here).
    calls: list[str] = []
    real_check = Backend.check_reference

    def check(self: Backend) -> None:
        calls.append(self.backend)
        if self.backend == ORT:
            raise ModelError("onnxruntime CPUExecutionProvider fp32: it does not compute this")
        real_check(self)

    monkeypatch.setattr(Backend, "check_reference", check)
    config = config_for(tiny, tuning_cache_dir=tmp_path)
    write_timings(config, timings)
    model = open_model(config)
    assert isinstance(model, OpenVinoModel)
    assert calls == checked
    entries = {f"{e['backend']} {e['precision']}": e for e in model.choice}
    onnxruntime = entries[ORT_FP32]
    assert onnxruntime["images_per_s"] > 0
    assert not onnxruntime["chosen"]
    assert "does not compute this" in onnxruntime["skipped"]
    assert entries[OV_FP32]["batch_sizes"] == list(BUCKETS)


def test_auto_serves_nothing_that_fails_the_reference_check(tmp_path: Path) -> None:
    # Its reference says the probes are class 0 at 0.99: these weights compute something else,
    # on every runtime, so auto has no candidate left and says why for each.
    entry = json.dumps({"probe": PROBE, "top": [[[0, 0.99]], [[0, 0.99]]]})
    path = build_model(tmp_path / "model.onnx", metadata={"reference": entry})
    with pytest.raises(ModelError, match="does not compute what was exported") as error:
        open_model(config_for(path))
    message = str(error.value)
    assert message.startswith("onnxruntime fp32: onnxruntime CPUExecutionProvider fp32: it does")
    assert "; openvino fp32: openvino OpenVINO CPU fp32: it does not" in message


def test_an_explicit_setting_is_one_line_before_workers_start(tiny: Path) -> None:
    config = config_for(tiny, backend="onnxruntime", model_precision="bf16")
    with pytest.raises(ModelError, match="computed by OpenVINO"):
        check_model(config)
    if not HAS_BF16:
        config = config_for(tiny, backend="openvino", model_precision="bf16")
        with pytest.raises(ModelError, match="model_precision=bf16: this CPU has no bf16"):
            check_model(config)
    assert check_model(config_for(tiny, backend="openvino")).name == "tiny-test"


def test_onnx_runtime_is_unchanged_when_pinned(tiny: Path) -> None:
    model = open_model(config_for(tiny, backend="onnxruntime"))
    assert isinstance(model, OnnxModel)
    assert model.choice == ({"backend": ORT, "precision": "fp32", "chosen": True},)


@pytest.mark.parametrize(
    ("settings", "copies"),
    [
        ({}, 3),  # ONNX Runtime's two sessions, and OpenVINO's candidate timed beside them
        ({"ort_spinning": "off"}, 2),
        ({"backend": "onnxruntime"}, 2),
        ({"backend": "onnxruntime", "ort_spinning": "off"}, 1),
        ({"backend": "openvino"}, 1),
    ],
)
def test_the_memory_budget_counts_every_copy_auto_holds_at_once(
    tiny: Path, settings: dict[str, str], copies: int
) -> None:
    assert peak_copies(config_for(tiny, **settings)) == copies
