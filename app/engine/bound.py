"""Bound buffers: per batch bucket, input and output tensors allocated once, where the model runs.

On CUDA they live on the device: a batch costs one host-to-device copy of its uint8 images and one
copy back of its probabilities, and with ``cuda_graphs`` each bucket replays the CUDA graph captured
at warm-up (one ``gpu_graph_id`` per bucket). On the CPU the same code runs on host buffers, which
is how CI tests it. Each lane (app.engine.lanes) gets its own set on first use, so batches
computing at once never share a buffer or a graph.

The whole bucket's probabilities come back, padding rows included, and the batcher drops the
padding: ORT's ``OrtValue`` copies a tensor to the host whole (``numpy()``), and copying fewer
rows would take another kernel on the device per batch. It is small: 64 rows x 1000 classes of
float32 are 256 KB, microseconds over PCIe next to a ResNet-50 batch's milliseconds. Top-k on
the device would need a TopK output in the graph, a change of the ONNX contract.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from core.contract import INPUT_NAME, OUTPUT_NAME


@dataclass
class _Slot:
    images: ort.OrtValue
    probabilities: ort.OrtValue
    binding: ort.IOBinding
    options: ort.RunOptions | None  # only to name a CUDA graph: reading it costs every run


class BoundBuckets:
    def __init__(
        self,
        session: ort.InferenceSession,
        buckets: Sequence[int],
        crop_size: int,
        num_classes: int,
        *,
        device: str,
        graphs: bool,
    ) -> None:
        self._session = session
        self._device = device
        self.buckets = list(buckets)
        self._shape = (crop_size, num_classes, device)
        self._graphs = graphs
        self._lanes = itertools.count()  # a CUDA graph id is unique per (thread, bucket)
        self._local = threading.local()

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8[B, S, S, 3] -> float32[B, C] for a bucket size B (the batcher pads to one)."""
        slot = self._slots().get(len(images))
        if slot is None:
            raise ValueError(f"a batch of {len(images)} is not one of the buckets {self.buckets}")
        slot.images.update_inplace(np.ascontiguousarray(images))
        self._session.run_with_iobinding(slot.binding, slot.options)
        probabilities: np.ndarray = slot.probabilities.numpy()
        # From the device, numpy() is the copy to the host, a new array. On the CPU it is a view
        # of the buffer this bucket's next batch overwrites, so it is copied here.
        return probabilities if self._device != "cpu" else probabilities.copy()

    def _slots(self) -> dict[int, _Slot]:
        slots: dict[int, _Slot] | None = getattr(self._local, "slots", None)
        if slots is None:
            first_id = next(self._lanes) * len(self.buckets)
            crop_size, num_classes, device = self._shape
            slots = self._local.slots = {
                bucket: _slot(
                    self._session,
                    bucket,
                    crop_size,
                    num_classes,
                    device,
                    first_id + index if self._graphs else None,
                )
                for index, bucket in enumerate(self.buckets)
            }
        return slots


def _slot(
    session: ort.InferenceSession,
    bucket: int,
    crop_size: int,
    num_classes: int,
    device: str,
    graph_id: int | None,
) -> _Slot:
    shape_in, shape_out = (bucket, crop_size, crop_size, 3), (bucket, num_classes)
    images = ort.OrtValue.ortvalue_from_shape_and_type(shape_in, np.uint8, device, 0)
    probabilities = ort.OrtValue.ortvalue_from_shape_and_type(shape_out, np.float32, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, images)
    binding.bind_ortvalue_output(OUTPUT_NAME, probabilities)
    options = None
    if graph_id is not None:
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return _Slot(images, probabilities, binding, options)
