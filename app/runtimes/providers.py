"""Execution providers: which to ask ONNX Runtime for, in which order, with which options, and
which model file each one serves. Pure functions of the settings and of what is installed, so
the CPU tests cover every choice and every fallback.

Options not set here keep ONNX Runtime's defaults. Sources: the CUDA provider's page
(https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html, and the defaults of
``OrtCUDAProviderOptionsV2``), the TensorRT provider's page
(https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.contract import INPUT_NAME, variant_path
from core.errors import ModelError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU = (TENSORRT, CUDA)

# The providers each setting accepts, best first; the last one is the last acceptable fallback.
ACCEPTABLE = {
    "auto": (CUDA, CPU),  # TensorRT only when asked for: its engine build takes minutes
    "cuda": (CUDA,),
    "tensorrt": (TENSORRT, CUDA),  # a GPU was asked for: never the CPU
    "cpu": (CPU,),
}
CONV_ALGO_SEARCH = {"exhaustive": "EXHAUSTIVE", "heuristic": "HEURISTIC", "default": "DEFAULT"}


@dataclass(frozen=True)
class GpuOptions:
    cuda_graphs: bool  # CUDA: one captured graph per batch bucket
    conv_algo_search: str  # exhaustive | heuristic | default (cuDNN's convolution algorithm)
    prefer_nhwc: bool  # CUDA: channels-last kernels where ORT has them
    trt_cache_dir: Path  # TensorRT engines and timing cache
    batch_range: tuple[int, int]  # smallest and largest batch bucket: TensorRT's profile


@dataclass(frozen=True)
class ProviderPlan:
    """The providers one ``providers`` setting gets on this machine, planned once per model
    version opened (``plan_providers``): the installed ones it accepts, best first, and why; or,
    when none is installed, only why (``OnnxModel.load`` raises it)."""

    setting: str  # auto | cuda | tensorrt | cpu
    chosen: tuple[str, ...]
    reason: str

    @property
    def first(self) -> str:
        """The provider a session is opened for first (the CPU's when none is installed: the
        sizing of lanes and buckets then follows the CPU, and loading says why it fails)."""
        return self.chosen[0] if self.chosen else CPU

    @property
    def gpu(self) -> bool:
        return self.first in GPU


def plan_providers(setting: str, available: Sequence[str]) -> ProviderPlan:
    try:
        chosen, reason = choose_providers(setting, available)
    except ModelError as exc:
        return ProviderPlan(setting, (), str(exc))
    return ProviderPlan(setting, tuple(chosen), reason)


def choose_providers(requested: str, available: Sequence[str]) -> tuple[list[str], str]:
    """The providers to try, best first, and why: those the setting accepts that are installed."""
    accepted = ACCEPTABLE[requested]
    chosen = [p for p in accepted if p in available]
    if not chosen:
        raise ModelError(
            f"providers={requested} needs one of {list(accepted)}, none is available "
            f"(have {list(available)})"
        )
    missing = [p for p in accepted[: accepted.index(chosen[0])]]
    reason = f"providers={requested}"
    if missing:
        reason += f"; {', '.join(missing)} not available (have {list(available)})"
    return chosen, reason


def session_providers(chosen: Sequence[str]) -> list[str]:
    """What one session is opened with: the CPU provider always last, for any node the GPU
    providers do not take (ORT then reports which provider actually came first)."""
    return [*chosen, CPU] if CPU not in chosen else list(chosen)


def model_file(path: Path, precision: str, provider: str) -> Path:
    """The file a provider serves for the ``model_precision`` setting.

    ``auto``: on CUDA the fp16 variant beside ``path`` (``model.fp16.onnx``) where it exists,
    else ``path``. TensorRT gets ``path``: it builds its own fp16 engine from the fp32 graph
    (``trt_fp16_enable``). The CPU gets ``path``: fp16 is slow there.
    A pinned precision: its variant beside ``path`` where it exists, else ``path`` (whose
    metadata must then say that precision; ``check_precision``).
    """
    if precision == "auto":
        fp16 = variant_path(path, "fp16")
        return fp16 if provider == CUDA and fp16.is_file() else path
    variant = variant_path(path, precision)
    return variant if variant.is_file() else path


def check_precision(requested: str, served: str, provider: str, path: Path) -> None:
    if requested != "auto" and served != requested:
        raise ModelError(
            f"model_precision={requested} but {path} is {served} "
            f"(and there is no {variant_path(path, requested).name} beside it)"
        )
    if requested == "auto" and served == "fp16" and provider == CPU:
        raise ModelError(
            f"{path} is fp16, which runs slowly on the CPU: serve the fp32 file there, "
            "or set RESNET_SERVE_MODEL_PRECISION=fp16 to serve it anyway"
        )


def provider_options(provider: str, options: GpuOptions, crop_size: int) -> dict[str, str]:
    if provider == CUDA:
        return cuda_options(options)
    if provider == TENSORRT:
        return tensorrt_options(options, crop_size)
    return {}


def cuda_options(options: GpuOptions) -> dict[str, str]:
    return {
        # Exhaustive (ORT's default) benchmarks every cuDNN algorithm once per shape: with a few
        # buckets, all warmed before readiness, its one-off cost is paid at start-up only.
        "cudnn_conv_algo_search": CONV_ALGO_SEARCH[options.conv_algo_search],
        # ORT's default since 1.14: the fastest algorithms of ResNet's convolutions need a
        # large workspace, which the search may then choose.
        "cudnn_conv_use_max_workspace": "1",
        # ORT's default, and the only safe one: separate copy streams can race (ORT issue 4829);
        # with IO binding there is one upload and one download per batch anyway.
        "do_copy_in_default_stream": "1",
        # Off by default in ORT; the graph already takes NHWC uint8 and transposes it inside,
        # so NHWC kernels may save that transpose: the GPU benchmark compares both.
        "prefer_nhwc": "1" if options.prefer_nhwc else "0",
        # A captured graph replays fixed device buffers: BoundBuckets binds one set per bucket.
        "enable_cuda_graph": "1" if options.cuda_graphs else "0",
    }


def tensorrt_options(options: GpuOptions, crop_size: int) -> dict[str, str]:
    smallest, largest = options.batch_range

    def shape(batch: int) -> str:
        return f"{INPUT_NAME}:{batch}x{crop_size}x{crop_size}x3"

    cache = str(options.trt_cache_dir)
    return {
        "trt_fp16_enable": "1",
        # Both caches live on the models volume: a restart loads the engine in seconds
        # instead of building it for minutes, and a rebuild (new model) reuses the timings.
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache,
        # One explicit profile over every bucket, tuned for the largest (throughput under load):
        # the engine is built once, at start-up, not again whenever a new batch size arrives.
        "trt_profile_min_shapes": shape(smallest),
        "trt_profile_opt_shapes": shape(largest),
        "trt_profile_max_shapes": shape(largest),
    }


def default_trt_cache_dir(model_path: Path) -> Path:
    return model_path.parent / "trt-cache"
