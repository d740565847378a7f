"""Provider choice, provider options and model-file choice: pure functions, no GPU needed; and the
fallback loop of ``OnnxModel.load`` on the real CPU ONNX Runtime, told that GPU providers exist."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from pydantic import ValidationError

from app.repository.configs import batch_buckets, runtime_config
from app.runtimes.onnxruntime import OnnxModel
from app.runtimes.providers import (
    CPU,
    CUDA,
    TENSORRT,
    GpuOptions,
    check_precision,
    choose_providers,
    cuda_options,
    model_file,
    session_providers,
    tensorrt_options,
)
from app.settings import Settings
from core.errors import ModelError
from tests.helpers.models import build_model

GPU_OPTIONS = GpuOptions(
    cuda_graphs=True,
    conv_algo_search="exhaustive",
    prefer_nhwc=False,
    trt_cache_dir=Path("/models/trt-cache"),
    batch_range=(1, 32),
)


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("auto", [TENSORRT, CUDA, CPU], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA]),
        ("tensorrt", [TENSORRT, CUDA, CPU], [TENSORRT, CUDA]),
        ("tensorrt", [CUDA, CPU], [CUDA]),
        ("cpu", [TENSORRT, CUDA, CPU], [CPU]),
    ],
    ids=[
        "auto-never-picks-tensorrt",
        "auto-without-cuda",
        "cuda-never-falls-to-cpu",
        "tensorrt-then-cuda",
        "tensorrt-missing-means-cuda",
        "cpu-forced",
    ],
)
def test_choose_providers(requested: str, available: list[str], expected: list[str]) -> None:
    providers, reason = choose_providers(requested, available)
    assert providers == expected
    assert f"providers={requested}" in reason


def test_a_missing_better_provider_is_named_in_the_reason() -> None:
    _, reason = choose_providers("tensorrt", [CUDA, CPU])
    assert f"{TENSORRT} not available" in reason


@pytest.mark.parametrize("requested", ["cuda", "tensorrt"])
def test_a_gpu_provider_requested_on_a_cpu_only_install_is_an_error(requested: str) -> None:
    with pytest.raises(ModelError, match=f"providers={requested} needs one of .*{CUDA}"):
        choose_providers(requested, [CPU])


def test_every_session_keeps_the_cpu_provider_last() -> None:
    assert session_providers([TENSORRT, CUDA]) == [TENSORRT, CUDA, CPU]
    assert session_providers([CUDA, CPU]) == [CUDA, CPU]


@pytest.mark.parametrize(
    ("precision", "provider", "siblings", "served"),
    [
        ("auto", CUDA, ["fp16"], "model.fp16.onnx"),
        ("auto", CUDA, [], "model.onnx"),
        ("auto", TENSORRT, ["fp16"], "model.onnx"),
        ("auto", CPU, ["fp16", "int8"], "model.onnx"),
        ("fp16", CPU, ["fp16"], "model.fp16.onnx"),
        ("int8", CPU, ["int8"], "model.int8.onnx"),
        ("int8", CPU, [], "model.onnx"),
    ],
    ids=[
        "auto-cuda-fp16",
        "auto-cuda-no-variant",
        "auto-tensorrt-builds-its-own-fp16",
        "auto-cpu-never-fp16",
        "pinned-fp16",
        "pinned-int8",
        "pinned-falls-to-model-path",
    ],
)
def test_model_file(
    tmp_path: Path, precision: str, provider: str, siblings: list[str], served: str
) -> None:
    path = tmp_path / "model.onnx"
    for name in ["model.onnx", *(f"model.{s}.onnx" for s in siblings)]:
        (tmp_path / name).write_bytes(b"")
    assert model_file(path, precision, provider) == tmp_path / served


def test_check_precision() -> None:
    path = Path("/models/model.onnx")
    check_precision("auto", "fp16", CUDA, path)
    check_precision("fp16", "fp16", CPU, path)  # pinned: the user insists
    with pytest.raises(ModelError, match=r"model_precision=int8 but .* is fp32.*model.int8.onnx"):
        check_precision("int8", "fp32", CPU, path)
    with pytest.raises(ModelError, match="fp16, which runs slowly on the CPU"):
        check_precision("auto", "fp16", CPU, path)


def test_cuda_options_are_the_documented_choices() -> None:
    assert cuda_options(GPU_OPTIONS) == {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "prefer_nhwc": "0",
        "enable_cuda_graph": "1",
    }
    other = GpuOptions(
        cuda_graphs=False,
        conv_algo_search="heuristic",
        prefer_nhwc=True,
        trt_cache_dir=Path("c"),
        batch_range=(1, 1),
    )
    assert cuda_options(other) | {
        "cudnn_conv_algo_search": "HEURISTIC",
        "prefer_nhwc": "1",
        "enable_cuda_graph": "0",
    } == cuda_options(other)


def test_tensorrt_profile_covers_every_bucket_and_caches_on_the_volume() -> None:
    options = tensorrt_options(GPU_OPTIONS, crop_size=224)
    assert options["trt_fp16_enable"] == "1"
    assert options["trt_profile_min_shapes"] == "images:1x224x224x3"
    assert options["trt_profile_opt_shapes"] == "images:32x224x224x3"
    assert options["trt_profile_max_shapes"] == "images:32x224x224x3"
    assert (
        options["trt_engine_cache_path"]
        == options["trt_timing_cache_path"]
        == ("/models/trt-cache")
    )
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "1"


def test_runtime_config_from_settings(model_path: Path) -> None:
    config = runtime_config(Settings(model_path=model_path, max_batch_size=48))
    assert config.onnxruntime.gpu.trt_cache_dir == model_path.parent / "trt-cache"
    assert config.onnxruntime.gpu.batch_range == (1, 48)
    assert config.precision == "auto"
    pinned = Settings(
        model_path=model_path,
        max_batch_size=8,
        batch_buckets=(4, 8),
        trt_cache_dir=Path("/cache"),
        providers="tensorrt",
    )
    assert runtime_config(pinned).onnxruntime.gpu.batch_range == (4, 8)
    assert runtime_config(pinned).onnxruntime.gpu.trt_cache_dir == Path("/cache")


def test_gpu_providers_get_power_of_two_buckets(model_path: Path) -> None:
    settings = Settings(model_path=model_path, max_batch_size=24)
    assert (
        batch_buckets(settings, TENSORRT) == batch_buckets(settings, CUDA) == (1, 2, 4, 8, 16, 24)
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("providers", "gpu"),
        ("model_precision", "fp64"),
        ("cuda_conv_algo_search", "fastest"),
    ],
)
def test_gpu_settings_are_validated(model_path: Path, name: str, value: str) -> None:
    values: dict[str, Any] = {"model_path": model_path, name: value}
    with pytest.raises(ValidationError, match=name):
        Settings(**values)


@pytest.fixture
def fp16_beside(tmp_path: Path) -> Path:
    """model.onnx (fp32) and model.fp16.onnx beside it (the tiny graph, labelled fp16)."""
    build_model(tmp_path / "model.fp16.onnx", metadata={"precision": "fp16"})
    return build_model(tmp_path / "model.onnx")


def test_the_cpu_serves_fp32_even_with_fp16_beside_it(
    fp16_beside: Path, make_settings: Callable[..., Settings]
) -> None:
    model = OnnxModel.load(runtime_config(make_settings(model_path=fp16_beside)))
    assert model.metadata.precision == "fp32"
    pinned = make_settings(model_path=fp16_beside, model_precision="fp16")
    assert OnnxModel.load(runtime_config(pinned)).metadata.precision == "fp16"


def test_an_fp16_model_path_on_the_cpu_is_refused_unless_pinned(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    path = build_model(tmp_path / "half.onnx", metadata={"precision": "fp16"})
    with pytest.raises(ModelError, match="runs slowly on the CPU"):
        OnnxModel.load(runtime_config(make_settings(model_path=path)))


def test_a_pinned_precision_that_is_not_there_is_an_error(
    fp16_beside: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(model_path=fp16_beside, model_precision="int8")
    with pytest.raises(ModelError, match="model_precision=int8 but"):
        OnnxModel.load(runtime_config(settings))


# ORT's CPU build warns about a provider it lacks, and opens the session on the CPU: exactly what
# onnxruntime-gpu does when the CUDA or TensorRT libraries are missing.
LACKING = pytest.mark.filterwarnings("ignore:Specified provider .* is not in available provider")


@LACKING
@pytest.mark.parametrize(
    ("providers", "error"),
    [
        ("auto", None),
        ("cuda", f"providers=cuda: {CUDA} failed to initialise"),
        ("tensorrt", f"providers=tensorrt: {CUDA} failed to initialise"),
    ],
)
def test_a_provider_that_fails_to_initialise_falls_back_only_where_accepted(
    fp16_beside: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    providers: str,
    error: str | None,
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    config = runtime_config(make_settings(model_path=fp16_beside, providers=providers))
    if error is not None:
        with pytest.raises(ModelError, match=error):
            OnnxModel.load(config)
        return
    model = OnnxModel.load(config)
    # CUDA would have served model.fp16.onnx; its CPU fallback reopens model.onnx instead.
    assert (model.provider, model.metadata.precision) == (CPU, "fp32")
    assert f"{CUDA} failed to initialise" in caplog.text


@LACKING
def test_tensorrt_missing_is_logged_before_cuda_is_tried(
    model_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ModelError, match=f"{CUDA} failed to initialise"):
        OnnxModel.load(runtime_config(make_settings(providers="tensorrt")))
    assert f"{TENSORRT} is not available: serving on {CUDA}" in caplog.text
