"""The ONNX Runtime session: provider choice, graph checks against the contract, inference.

Bound buffers (``BoundBuckets``): per batch bucket, input and output tensors allocated once, where
the model runs.

On CUDA they live on the device: a batch costs one host-to-device copy of its uint8 images and one
copy back of its probabilities, and with ``cuda_graphs`` each bucket replays the CUDA graph captured
at warm-up (one ``gpu_graph_id`` per bucket). On the CPU the same code runs on host buffers, which
is how CI tests it. Each lane (app.batching.lanes) gets its own set on first use, so batches
computing at once never share a buffer or a graph.

The whole bucket's probabilities come back, padding rows included, and the batcher drops the
padding: ORT's ``OrtValue`` copies a tensor to the host whole (``numpy()``), and copying fewer
rows would take another kernel on the device per batch. It is small: 64 rows x 1000 classes of
float32 are 256 KB, microseconds over PCIe next to a ResNet-50 batch's milliseconds. Top-k on
the device would need a TopK output in the graph, a change of the ONNX contract.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.runtimes.base import Backend, Outputs, Runtime
from app.runtimes.config import RuntimeConfig
from app.runtimes.graph import check_onnx
from app.runtimes.providers import (
    CPU,
    CUDA,
    GPU,
    TENSORRT,
    check_precision,
    model_file,
    provider_options,
    session_providers,
)
from core.contract import (
    CLASS_IDS_NAME,
    CLASS_MAP_NAME,
    CLASSIFY,
    INPUT_NAME,
    OUTPUT_NAME,
    SERVED_OUTPUTS,
    ModelMetadata,
)
from core.errors import ModelError

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# ORT's thread pool spins while it waits for work. "always" (ORT's default) also spins between
# runs, which took the CPU the decoders needed at saturation; "off" parks the threads after every
# parallel operator, which costs each run the wake-ups; "in_run" spins within a run only.
# "adaptive" (the default) is "off", plus a second session that spins within its runs for a batch
# that has the machine to itself (app.batching.batcher: nothing else computing, queued or admitted):
# a lone request gets spinning's latency, and a busy server, which never takes the spinning session,
# keeps its CPU for decoding. The second session costs memory; docs/workers.md has both measured.
NEVER_SPIN = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
SPINNING = {
    "off": NEVER_SPIN,
    "adaptive": NEVER_SPIN,  # the session under load; the one for lone batches: ALONE_SPINNING
    "in_run": {"session.force_spinning_stop": "1"},
    "always": {},
}
# "adaptive" on the CPU: a second session of the same file, whose threads spin within a run,
# computes a batch that runs alone with nothing queued; under load the one that never spins
# does. Spinning's latency at low load, its CPU kept for decoding under load.
ALONE_SPINNING = "in_run"


class OnnxModel(Backend):
    backend = "onnxruntime"

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        cuda_graphs: bool = False,
        alone: ort.InferenceSession | None = None,
    ) -> None:
        self._session = session
        self._alone = alone
        self.metadata = metadata
        self.provider = session.get_providers()[0]
        # TensorRT builds an fp16 engine from the fp32 file (trt_fp16_enable).
        self.precision = "fp16" if self.provider == TENSORRT else metadata.precision
        self.cuda_graphs = cuda_graphs
        self.outputs = served_outputs(session)
        self.shapes = _row_shapes(session, metadata, self.outputs)
        self._bound: BoundBuckets | None = None
        self._alone_bound: BoundBuckets | None = None

    @classmethod
    def load(cls, config: RuntimeConfig) -> OnnxModel:
        if not config.model_path.is_file():
            raise ModelError(
                f"model file not found: {config.model_path} (set RESNET_SERVE_MODEL_PATH)"
            )
        plan = config.providers
        if not plan.chosen:
            raise ModelError(plan.reason)
        chosen, reason = list(plan.chosen), plan.reason
        if plan.setting == "tensorrt" and chosen[0] != TENSORRT:
            log.warning("%s is not available: serving on %s", TENSORRT, chosen[0])
        # A provider that fails to initialise (missing libraries) makes ORT fall back in
        # silence; each fallback the setting accepts is opened afresh, with its own file.
        for index, provider in enumerate(chosen):
            path = model_file(config.model_path, config.precision, provider)
            session = _open_session(path, session_providers(chosen[index:]), config)
            if session.get_providers()[0] == provider:
                break
            following = chosen[index + 1] if index + 1 < len(chosen) else None
            if following is None:
                raise ModelError(
                    f"providers={plan.setting}: {provider} failed to initialise and "
                    "nothing else is accepted; see the onnxruntime log above"
                )
            reason += f"; {provider} failed to initialise, falling back to {following}"
            log.warning(
                "%s failed to initialise (see the onnxruntime log above); trying %s",
                provider,
                following,
            )
        metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        check_precision(config.precision, metadata.precision, provider, path)
        check_onnx(session, metadata)
        alone = None
        # With one core to the process there is no pool to spin: a second session buys nothing.
        options = config.onnxruntime
        if options.spinning == "adaptive" and provider == CPU and config.alone_threads != 1:
            lone = replace(
                config,
                intra_op_threads=config.alone_threads,
                onnxruntime=replace(options, spinning=ALONE_SPINNING),
            )
            alone = _open_session(path, [CPU], lone)
        model = cls(session, metadata, cuda_graphs=options.gpu.cuda_graphs, alone=alone)
        log.info(
            "model loaded",
            extra={"provider": model.provider, "path": str(path), "reason": reason},
        )
        return model

    @staticmethod
    def check(config: RuntimeConfig) -> ModelMetadata:
        """What ``load`` checks of the file the best provider would serve, on a throwaway
        unoptimised CPU session: a supervisor validates the model this way and leaves the
        device to the workers, which open their own."""
        if not config.model_path.is_file():
            raise ModelError(
                f"model file not found: {config.model_path} (set RESNET_SERVE_MODEL_PATH)"
            )
        if not config.providers.chosen:
            raise ModelError(config.providers.reason)
        first = config.providers.first
        path = model_file(config.model_path, config.precision, first)
        unoptimised = replace(config.onnxruntime, graph_optimization="disable")
        cpu = replace(config, intra_op_threads=1, onnxruntime=unoptimised)
        session = _open_session(path, [CPU], cpu)
        metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        check_precision(config.precision, metadata.precision, first, path)
        check_onnx(session, metadata)
        return metadata

    @property
    def adaptive(self) -> bool:
        """Whether ``run_alone`` has a session of its own (``ort_spinning=adaptive``)."""
        return self._alone is not None

    def bind(self, buckets: Sequence[int]) -> None:
        """Allocate each bucket's buffers once; from now on only bucket sizes may be run."""
        super().bind(buckets)
        self._bound = self._bind(self._session, buckets)
        if self._alone is not None:
            self._alone_bound = self._bind(self._alone, buckets)

    def _bind(self, session: ort.InferenceSession, buckets: Sequence[int]) -> BoundBuckets:
        return BoundBuckets(
            session,
            buckets,
            self.metadata.recipe.crop_size,
            self.shapes,
            device="cuda" if self.provider in GPU else "cpu",
            class_ids=_takes_class_ids(session),
            # TensorRT runs its engine in one launch already; graphs are the CUDA provider's.
            graphs=self.provider == CUDA and self.cuda_graphs,
        )

    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        """uint8[N, S, S, 3] -> each of ``outputs``, [N, ...]."""
        return _run(self._session, self._bound, images, outputs, class_ids)

    def run_alone(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        """``run`` for a batch that has the machine to itself (nothing else running or queued):
        on the session that spins, where there is one."""
        if self._alone is None:
            return self.run(images, outputs, class_ids)
        return _run(self._alone, self._alone_bound, images, outputs, class_ids)

    @property
    def warms_per_thread(self) -> bool:
        """Whether each inference thread must warm every bucket itself: on a GPU it captures
        its own CUDA graphs and selects kernels on its own buffers. On the CPU a shape's plan
        belongs to the session, and a thread's buffers are allocated at its first batch."""
        return self.provider in GPU


def served_outputs(session: ort.InferenceSession) -> frozenset[str]:
    """The contract's outputs the file has: the class map only with the class ids input."""
    names = {node.name for node in session.get_outputs()}
    if not _takes_class_ids(session):
        names.discard(CLASS_MAP_NAME)
    return frozenset(name for name in SERVED_OUTPUTS if name in names)


def _takes_class_ids(session: ort.InferenceSession) -> bool:
    # Optional (export gives it a default, core.contract): ORT lists it with the initializers a
    # run may override, not with the inputs.
    nodes = [*session.get_inputs(), *session.get_overridable_initializers()]
    return CLASS_IDS_NAME in {node.name for node in nodes}


def _run(
    session: ort.InferenceSession,
    bound: BoundBuckets | None,
    images: np.ndarray,
    outputs: frozenset[str],
    class_ids: np.ndarray | None,
) -> Outputs:
    if bound is not None:
        return bound.run(images, outputs, class_ids)
    feeds = {INPUT_NAME: images}
    if class_ids is not None:
        feeds[CLASS_IDS_NAME] = _ids(class_ids, len(images))
    names = sorted(outputs)
    answered = session.run(names, feeds)
    return {name: np.asarray(output) for name, output in zip(names, answered, strict=True)}


def _ids(class_ids: np.ndarray | None, images: int) -> np.ndarray:
    if class_ids is None:
        return np.full(images, -1, dtype=np.int64)
    return np.ascontiguousarray(class_ids, dtype=np.int64)


def _open_session(path: Path, providers: list[str], config: RuntimeConfig) -> ort.InferenceSession:
    own = config.onnxruntime
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = OPTIMIZATION_LEVELS[own.graph_optimization]
    # The session's own warnings: only "Initializer class_ids appears in graph inputs", about the
    # class ids' default (core.contract), which is there on purpose. A provider that fails to
    # load still says so, through ORT's default logger.
    options.log_severity_level = 3
    for key, value in SPINNING[own.spinning].items():
        options.add_session_config_entry(key, value)
    # TensorRT's profile needs the crop size before the session exists: a CPU session with
    # optimisation off reads the metadata (well under a second even for ResNet-50).
    crop = _crop_size(path) if TENSORRT in providers else 0
    chosen = [(p, provider_options(p, own.gpu, crop)) for p in providers]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # ORT raises its own exception types, not importable uniformly
        raise ModelError(f"cannot load ONNX model {path}: {_first_line(exc)}") from exc


def _crop_size(path: Path) -> int:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
    except Exception as exc:  # as above
        raise ModelError(f"cannot load ONNX model {path}: {_first_line(exc)}") from exc
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map).recipe.crop_size


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class _Binding:
    """A bucket's buffers bound for one set of outputs."""

    binding: ort.IOBinding
    outputs: dict[str, ort.OrtValue]
    options: ort.RunOptions | None  # only to name a CUDA graph: reading it costs every run


@dataclass
class _Slot:
    images: ort.OrtValue
    class_ids: ort.OrtValue | None  # where the file takes them
    bindings: dict[frozenset[str], _Binding]
    graph_id: int | None
    chosen: bool = False  # class_ids hold a batch's choices, not all -1


class BoundBuckets:
    def __init__(
        self,
        session: ort.InferenceSession,
        buckets: Sequence[int],
        crop_size: int,
        rows: Mapping[str, tuple[int, ...]],
        *,
        device: str,
        graphs: bool,
        class_ids: bool = False,
    ) -> None:
        """``rows``: each output that may be bound, with the shape of one image's row of it;
        ``class_ids``: whether the graph takes them."""
        self._session = session
        self._device = device
        self.buckets = list(buckets)
        self._rows = dict(rows)
        self._class_ids = class_ids
        self._crop_size = crop_size
        self._graphs = graphs
        self._lanes = itertools.count()  # a CUDA graph id is unique per (thread, bucket)
        self._local = threading.local()

    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        """uint8[B, S, S, 3] -> each of ``outputs``, [B, ...], for a bucket size B (the batcher
        pads to one). Only the outputs asked for are bound and copied back."""
        slot = self._slots().get(len(images))
        if slot is None:
            raise ValueError(f"a batch of {len(images)} is not one of the buckets {self.buckets}")
        slot.images.update_inplace(np.ascontiguousarray(images))
        if slot.class_ids is not None and (class_ids is not None or slot.chosen):
            slot.class_ids.update_inplace(_ids(class_ids, len(images)))
            slot.chosen = class_ids is not None
        bound = slot.bindings.get(outputs)
        if bound is None:
            bound = slot.bindings[outputs] = self._bind(slot, outputs)
        self._session.run_with_iobinding(bound.binding, bound.options)
        # From the device, numpy() is the copy to the host, a new array. On the CPU it is a view
        # of the buffer this bucket's next batch overwrites, so it is copied here.
        on_cpu = self._device == "cpu"
        return {
            name: value.numpy().copy() if on_cpu else value.numpy()
            for name, value in bound.outputs.items()
        }

    def _bind(self, slot: _Slot, outputs: frozenset[str]) -> _Binding:
        unknown = outputs - set(self._rows)
        if unknown:
            raise ValueError(f"the model has no output {sorted(unknown)}")
        bucket = slot.images.shape()[0]
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, slot.images)
        if slot.class_ids is not None:
            binding.bind_ortvalue_input(CLASS_IDS_NAME, slot.class_ids)
        values = {}
        for name in sorted(outputs):
            shape = (bucket, *self._rows[name])
            values[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                shape, np.float32, self._device, 0
            )
            binding.bind_ortvalue_output(name, values[name])
        options = None
        if slot.graph_id is not None:
            # One CUDA graph per bucket, for the classification: a graph replays the buffers it
            # was captured with, so another set of outputs runs without one (-1).
            options = ort.RunOptions()
            graph = slot.graph_id if outputs == CLASSIFY else -1
            options.add_run_config_entry("gpu_graph_id", str(graph))
        return _Binding(binding, values, options)

    def _slots(self) -> dict[int, _Slot]:
        slots: dict[int, _Slot] | None = getattr(self._local, "slots", None)
        if slots is None:
            first_id = next(self._lanes) * len(self.buckets)
            slots = self._local.slots = {
                bucket: self._slot(bucket, first_id + index)
                for index, bucket in enumerate(self.buckets)
            }
        return slots

    def _slot(self, bucket: int, graph_id: int) -> _Slot:
        shape_in = (bucket, self._crop_size, self._crop_size, 3)
        images = ort.OrtValue.ortvalue_from_shape_and_type(shape_in, np.uint8, self._device, 0)
        class_ids = None
        if self._class_ids:
            class_ids = ort.OrtValue.ortvalue_from_numpy(_ids(None, bucket), self._device, 0)
        return _Slot(images, class_ids, {}, graph_id if self._graphs else None)


def _row_shapes(
    session: ort.InferenceSession, metadata: ModelMetadata, served: frozenset[str]
) -> dict[str, tuple[int, ...]]:
    """One image's row of each served output: the probabilities' [C] from the metadata, any
    other's from the graph, whose dimensions past the batch must then be static."""
    graph = {node.name: node.shape for node in session.get_outputs()}
    rows: dict[str, tuple[int, ...]] = {}
    for name in served:
        if name == OUTPUT_NAME:
            rows[name] = (metadata.num_classes,)
            continue
        dims = graph[name][1:]
        if not all(isinstance(dim, int) for dim in dims):
            raise ModelError(f"output {name!r} has shape {graph[name]}: only its batch may vary")
        rows[name] = tuple(int(dim) for dim in dims)
    return rows


def _open(precision: str, config: RuntimeConfig) -> OnnxModel:
    return OnnxModel.load(replace(config, precision=precision))


def _copies(config: RuntimeConfig) -> int:
    # ``adaptive`` on the CPU opens a second session, for lone batches.
    return 2 if config.onnxruntime.spinning == "adaptive" else 1


def _always(precision: str) -> None:
    """ONNX Runtime computes every precision it lists wherever it is installed."""


RUNTIME = Runtime(
    name="onnxruntime",
    title="ONNX Runtime",
    precisions=("fp32", "fp16", "int8"),
    gpu=True,
    open=_open,
    auto_precision=lambda bf16: "auto",
    unavailable=lambda precision: None,
    require=_always,
    copies=_copies,
    version=lambda: str(ort.__version__),
)
