"""OpenVINO on the CPU: the same ONNX file, read directly, computed in fp32, in bf16 where the CPU
has it (AVX-512 bf16, AMX), or from the int8 file's QDQ graph.

Lanes map onto OpenVINO's streams, one to one: the model is compiled with as many streams as
the batcher has lanes, the lanes' threads shared among them, and each lane thread infers through an
infer request of its own, synchronously. Two batches computing at once then run on two streams,
as two ORT runs do on two lanes, and the batcher, buckets, warm-up and batch-limit fit work
unchanged. OpenVINO's throughput hint would pick its own stream count and wants requests queued
asynchronously; the batcher already keeps exactly ``lanes`` batches in flight.

One compiled model serves every bucket: the batch axis stays dynamic, as fast as a static shape
per bucket within noise (docs/backends.md), with one copy of the weights instead of one per
bucket.
"""

from __future__ import annotations

import logging
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from app.runtimes.base import Backend, Outputs, Runtime
from app.runtimes.config import RuntimeConfig
from app.runtimes.graph import check_openvino
from app.runtimes.providers import check_precision, model_file
from core.contract import (
    CLASS_IDS_NAME,
    CLASS_MAP_NAME,
    CLASSIFY,
    INPUT_NAME,
    SERVED_OUTPUTS,
    ModelMetadata,
)
from core.errors import ModelError

log = logging.getLogger(__name__)

DEVICE = "CPU"
PROVIDER = "OpenVINO CPU"
# The hint OpenVINO takes for each precision the service computes in. int8 comes from the int8
# file's quantised graph; its other layers run in fp32.
PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def unavailable(precision: str) -> str | None:
    """Why OpenVINO cannot compute ``precision`` on this machine; None when it can."""
    try:
        core()
    except ImportError as exc:
        return f"openvino is not installed ({exc})"
    except RuntimeError as exc:  # no CPU plugin: a broken install
        return f"openvino cannot start: {str(exc).splitlines()[0]}"
    if precision == "bf16" and not has_bf16():
        return "this CPU has no bf16 (OpenVINO reports no BF16 capability: avx512_bf16 or AMX)"
    return None


def require(precision: str) -> None:
    """Raises ModelError, one line naming the settings, where ``unavailable`` says why."""
    reason = unavailable(precision)
    if reason is not None:
        raise ModelError(
            f"backend=openvino, model_precision={precision}: {reason}; set "
            "RESNET_SERVE_BACKEND=auto or onnxruntime, or another RESNET_SERVE_MODEL_PRECISION"
        )


def has_bf16() -> bool:
    """Whether OpenVINO computes bf16 on this CPU (it reports BF16 with avx512_bf16 or AMX; without
    them it silently computes fp32 for a bf16 hint, so the hint alone proves nothing)."""
    return "BF16" in core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


def _openvino() -> Any:
    import openvino  # type: ignore[import-untyped]

    return openvino


@cache
def core() -> Any:
    ov_core = _openvino().Core()
    ov_core.get_property(DEVICE, "FULL_DEVICE_NAME")  # raises now, not at the first model
    return ov_core


class OpenVinoModel(Backend):
    backend = "openvino"
    provider = PROVIDER

    def __init__(self, compiled: Any, metadata: ModelMetadata, precision: str) -> None:
        self._compiled = compiled
        names = {name for port in compiled.outputs for name in port.get_names()}
        self._class_ids = CLASS_IDS_NAME in {
            name for port in compiled.inputs for name in port.get_names()
        }
        if not self._class_ids:
            names.discard(CLASS_MAP_NAME)
        self.outputs = frozenset(name for name in SERVED_OUTPUTS if name in names)
        self._outputs = {name: compiled.output(name) for name in self.outputs}
        self.shapes = {
            name: tuple(
                dim.get_length() if dim.is_static else -1
                for dim in list(port.get_partial_shape())[1:]
            )
            for name, port in self._outputs.items()
        }
        self.metadata = metadata
        self.precision = precision
        self._local = threading.local()
        self._requests: list[Any] = []  # every lane's, so close() lets them all go

    @classmethod
    def load(cls, path: Path, precision: str, *, lanes: int, threads: int) -> OpenVinoModel:
        """``precision``: fp32, bf16 (the fp32 file) or int8 (the int8 file beside ``path``).
        ``threads``: all the lanes' threads together, 0 to let OpenVINO choose."""
        require(precision)
        file_precision = "fp32" if precision == "bf16" else precision
        source = model_file(path, file_precision, DEVICE)
        if not source.is_file():
            raise ModelError(f"model file not found: {source} (set RESNET_SERVE_MODEL_PATH)")
        try:
            model = _read_onnx(source)
        except Exception as exc:  # OpenVINO raises its own types (GeneralFailure, ...)
            raise ModelError(f"OpenVINO cannot read {source}: {_last_line(exc)}") from exc
        metadata = ModelMetadata.from_props(_metadata_props(model))
        check_precision(file_precision, metadata.precision, DEVICE, source)
        check_openvino(model, metadata)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINT[precision],
            "NUM_STREAMS": lanes,
            "PERFORMANCE_HINT": "LATENCY" if lanes == 1 else "THROUGHPUT",
            # As ONNX Runtime's threads: unpinned, so the decoders and HTTP share the cores.
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            compiled = core().compile_model(model, DEVICE, config)
        except RuntimeError as exc:
            raise ModelError(f"OpenVINO cannot compile {source}: {_last_line(exc)}") from exc
        computed = computed_precision(compiled)
        if precision == "bf16" and computed != "bf16":
            raise ModelError(f"OpenVINO compiled {source} for {computed}, not bf16")
        log.info(
            "openvino model compiled",
            extra={"path": str(source), "computes": computed, "streams": lanes},
        )
        model = cls(compiled, metadata, precision)
        # The binding sets up its numpy glue (static locals, pybind11's call_once) on first use,
        # and two threads making that first use at once deadlock each other (seen: two lanes'
        # first warm-up batches, a server never ready). One batch here, on one thread, first.
        crop = metadata.recipe.crop_size
        model.run(np.zeros((1, crop, crop, 3), dtype=np.uint8))
        model.close_requests()
        return model

    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
            self._requests.append(request)
        # Shared input: OpenVINO reads the batch in place; the outputs asked for are copied out
        # of the request's buffers, which this lane's next batch overwrites.
        feeds = {INPUT_NAME: np.ascontiguousarray(images)}
        if self._class_ids:
            feeds[CLASS_IDS_NAME] = (
                np.full(len(images), -1, dtype=np.int64)
                if class_ids is None
                else np.ascontiguousarray(class_ids, dtype=np.int64)
            )
        results = request.infer(feeds, share_inputs=True)
        return {
            name: np.array(results[self._outputs[name]], dtype=np.float32, copy=True)
            for name in outputs
        }

    def close(self) -> None:
        self.close_requests()
        self._compiled = None

    def close_requests(self) -> None:
        """Let every thread's infer request go (this thread's next batch makes a new one)."""
        self._requests.clear()
        self._local = threading.local()


def computed_precision(compiled: Any) -> str:
    """What a compiled model computes in, as OpenVINO names it: f32, bf16 (its ``str`` is
    "<Type: 'bfloat16'>", hence the type name)."""
    name: str = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return name


def _read_onnx(path: Path) -> Any:
    # The ONNX frontend alone: Core.read_model tries every frontend on a file it cannot parse,
    # and TensorFlow's writes its own complaints to stderr, several lines for one bad file.
    from openvino.frontend import FrontEndManager  # type: ignore[import-untyped]

    frontend = FrontEndManager().load_by_framework("onnx")
    return _class_ids_fed(frontend.convert(frontend.load(str(path))))


def _class_ids_fed(model: Any) -> Any:
    """The model, its optional class ids input made one that is fed: OpenVINO reads an input with
    a default (an initializer of its name, core.contract) as a constant, and would then draw
    every map for the top class whatever a request asks."""
    constants = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and CLASS_IDS_NAME in op.output(0).get_names()
    ]
    if not constants:
        return model
    ov = _openvino()
    fed = ov.opset13.parameter(ov.PartialShape([-1]), ov.Type.i64, name=CLASS_IDS_NAME)
    fed.output(0).get_tensor().set_names({CLASS_IDS_NAME})
    for target in list(constants[0].output(0).get_target_inputs()):
        target.replace_source_output(fed.output(0))
    model.add_parameters([fed])
    model.validate_nodes_and_infer_types()
    return model


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _metadata_props(model: Any) -> dict[str, str]:
    # OpenVINO keeps the ONNX file's metadata_props under rt_info["framework"].
    if not model.has_rt_info(["framework"]):
        return {}
    keys = model.get_rt_info()["framework"]
    return {key: model.get_rt_info(["framework", key]).astype(str) for key in keys}


def _open(precision: str, config: RuntimeConfig) -> OpenVinoModel:
    return OpenVinoModel.load(
        config.model_path, precision, lanes=config.lanes, threads=config.alone_threads
    )


RUNTIME = Runtime(
    name="openvino",
    title="OpenVINO",
    precisions=("fp32", "bf16", "int8"),
    gpu=False,
    open=_open,
    auto_precision=lambda bf16: "bf16" if bf16 else "fp32",
    unavailable=unavailable,
    require=require,
    copies=lambda config: 1,
    version=lambda: str(_openvino().get_version()),
)
