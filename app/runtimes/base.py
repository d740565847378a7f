"""The one seam between the serving code and a runtime: what the batcher, lanes, warm-up,
batch-limit fit and admission use of a loaded model, whichever runtime computes it (ONNX Runtime in
app.runtimes.onnxruntime, OpenVINO in app.runtimes.openvino; app.runtimes.registry lists them and
chooses). A runtime is a module with a ``Backend`` and its ``Runtime`` entry, and one line in the
registry.

A backend computes ``run`` (uint8[N, S, S, 3] -> the named outputs a batch asks for, among those
of the contract's, ``core.contract.SERVED_OUTPUTS``, that its file has; a row per image) for batch
sizes among the buckets it was bound to; ``predict`` is its probabilities alone. Everything else
here (warm-up runs, timings, the self-check against the file's reference outputs) is the same code
on every runtime, so a second runtime cannot skip the check that the first one passes.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from core.contract import CLASSIFY, OUTPUT_NAME, ModelMetadata
from core.errors import ModelError
from core.reference import eval_images, extras_mismatch, judge, mismatch, probe_images

if TYPE_CHECKING:
    from app.runtimes.config import RuntimeConfig

log = logging.getLogger(__name__)

# Each served output by name (core.contract.SERVED_OUTPUTS), a row per image.
Outputs = dict[str, np.ndarray]

NO_REFERENCE = (
    "the file has no reference outputs in its metadata ('reference', written by python -m model "
    "export), so what a runtime computes from it cannot be checked: re-export it, or set "
    "RESNET_SERVE_REFERENCE_CHECK=false to serve it unchecked"
)
# Probabilities of a row (self_check): each in [0, 1], summing to 1 within this (fp16 rounds).
SUM_TOLERANCE = 1e-2


class Backend(ABC):
    metadata: ModelMetadata
    backend: str  # onnxruntime | openvino
    provider: str  # where it computes: ORT's execution provider, or OpenVINO's device
    precision: str  # what it computes in: fp32 | fp16 | bf16 | int8 (bf16: an fp32 file)
    # What app.runtimes.registry tried before choosing it: each candidate's timing or why it was
    # skipped, for /v1/model and the page.
    choice: tuple[dict[str, Any], ...] = ()
    reference_check: bool = True  # false: serve without the check (logged at warning)
    buckets: tuple[int, ...] = ()  # the batch sizes it runs once bound
    # The served outputs its file has (core.contract.SERVED_OUTPUTS): the probabilities, and the
    # others where it was exported with them (and takes the class ids input).
    outputs: frozenset[str] = CLASSIFY
    # One image's row of each of them: its shape past the batch axis (-1 where it varies).
    shapes: Mapping[str, tuple[int, ...]] = MappingProxyType({})

    @abstractmethod
    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        """uint8[N, S, S, 3] -> each of ``outputs`` by name, [N, ...], maybe others beside; N a
        bound bucket (once bound). ``class_ids``: int64[N], the class whose map each image's
        ``class_map`` row is (-1: its top class); None: every image's top class."""

    def run_alone(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        """``run`` for a batch that has the machine to itself (nothing else running or queued);
        a backend with a faster way for that case (``adaptive``) overrides it."""
        return self.run(images, outputs, class_ids)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The probabilities alone, float32[N, C]: what warm-up, the checks and timings need."""
        return self.run(images)[OUTPUT_NAME]

    @property
    def adaptive(self) -> bool:
        """Whether ``run_alone`` differs from ``run``."""
        return False

    def bind(self, buckets: Sequence[int]) -> None:
        """Prepare each bucket once; from now on only bucket sizes are run."""
        self.buckets = tuple(buckets)

    @property
    def warms_per_thread(self) -> bool:
        """Whether each inference thread must warm every bucket itself (its own device state)."""
        return False

    def close(self) -> None:  # noqa: B027 (optional: a no-op here)
        """Let the runtime's memory go now (a candidate ``auto`` did not choose)."""

    def describe(self) -> str:
        return f"{self.backend} {self.provider} {self.precision}"

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        # The first run of each shape pays for memory planning and kernel selection.
        for images in self._zeros(batch_sizes):
            self.run(images)

    def warm_up_alone(self, batch_sizes: Iterable[int]) -> None:
        """``warm_up`` for the way of lone batches, where it differs."""
        if self.adaptive:
            for images in self._zeros(batch_sizes):
                self.run_alone(images)

    def time_runs(self, batch_sizes: Iterable[int]) -> dict[int, float]:
        """Seconds of one warm run of each size (app.batching.limit)."""
        seconds = {}
        for images in self._zeros(batch_sizes):
            started = time.perf_counter()
            self.run(images)
            seconds[len(images)] = time.perf_counter() - started
        return seconds

    def self_check(self, batch: int) -> None:
        """``check_rows``, and the file's reference outputs come out (``check_reference``).
        Raises ModelError: a version that fails it never serves."""
        self.check_rows(batch)
        self.check_reference()

    def check_rows(self, batch: int) -> None:
        """A batch of varied images gives every served output a row each, and one probability
        row each: finite, in [0, 1], summing to 1, and the same row whatever else shares the
        batch (no row leaks into another)."""
        size = self.metadata.recipe.crop_size
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        outputs = self.run(images, self.outputs)
        missing = [name for name in self.outputs if len(outputs.get(name, ())) != batch]
        if missing:
            raise ModelError(f"the model answered no row per image for {missing}")
        rows = outputs[OUTPUT_NAME]
        expected = (batch, self.metadata.num_classes)
        if rows.shape != expected:
            raise ModelError(f"the model answered shape {list(rows.shape)} for {list(expected)}")
        if not np.isfinite(rows).all() or rows.min() < 0 or rows.max() > 1:
            raise ModelError("the model's probabilities are not all finite and within [0, 1]")
        sums = rows.sum(axis=1)
        if np.abs(sums - 1).max() > SUM_TOLERANCE:
            raise ModelError(
                f"the model's probabilities sum to {sums.min():.4g}..{sums.max():.4g}, not 1"
            )
        if batch > 1:
            alone = self.predict(np.concatenate([images[:1], np.zeros_like(images[1:])]))
            if not np.allclose(alone[0], rows[0], atol=1e-3):
                raise ModelError("a row's probabilities change with the other rows of its batch")

    def check_reference(self) -> None:
        """The file's reference outputs (core.reference), computed here: its probes, and its
        evaluation images within the bounds of the precision this backend computes in."""
        reference = self.metadata.reference
        if not self.reference_check:
            log.warning(
                "serving without the reference check (reference_check=false)",
                extra={"model": self.metadata.name, "backend": self.describe()},
            )
            return
        if reference is None:
            raise ModelError(NO_REFERENCE)
        size = self.metadata.recipe.crop_size
        probes = self._all_rows(probe_images(size))
        reason = mismatch(reference, probes[OUTPUT_NAME], self.precision)
        if reason is None and "extras" in reference:
            if self.outputs != frozenset(probes):
                reason = f"its file lacks outputs its reference has: {sorted(probes)}"
            reason = reason or extras_mismatch(reference["extras"], probes, self.precision)
        if reason is None and "eval" in reference:
            try:
                images = eval_images(reference["eval"])
            except (KeyError, TypeError, ValueError, OSError) as exc:
                raise ModelError(f"its metadata 'reference' cannot be read: {exc}") from exc
            if images.shape[1:] != (size, size, 3):
                raise ModelError(
                    f"its metadata 'reference' holds {list(images.shape[1:])} images, not the "
                    f"model's {[size, size, 3]}: it does not belong to this model"
                )
            reason = judge(reference["eval"], self._rows(images), self.precision)
        if reason is not None:
            raise ModelError(f"{self.describe()}: {reason}")

    def _rows(self, images: np.ndarray) -> np.ndarray:
        """``predict`` of each image, in the smallest bucket (the others padded with zeros)."""
        return self._all_rows(images, CLASSIFY)[OUTPUT_NAME]

    def _all_rows(
        self, images: np.ndarray, outputs: frozenset[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Each of ``outputs`` (default: all the file has) for each image, one at a time in the
        smallest bucket (the others padded with zeros)."""
        wanted = self.outputs if outputs is None else outputs
        bucket = self.buckets[0] if self.buckets else 1
        rows: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
        for image in images:
            batch = np.zeros((bucket, *image.shape), dtype=np.uint8)
            batch[0] = image
            answered = self.run(batch, wanted)
            for name in wanted:
                rows[name].append(answered[name][0])
        return {name: np.stack(each) for name, each in rows.items()}

    def _zeros(self, batch_sizes: Iterable[int]) -> Iterator[np.ndarray]:
        size = self.metadata.recipe.crop_size
        for batch_size in batch_sizes:
            yield np.zeros((batch_size, size, size, 3), dtype=np.uint8)


@dataclass(frozen=True)
class Runtime:
    """A runtime the server can serve a model file on, as the registry knows it."""

    name: str  # the ``backend`` setting's value
    title: str  # as messages name it
    # What it computes: the precisions of the files it reads, and bf16 from an fp32 file.
    precisions: tuple[str, ...]
    gpu: bool  # whether it serves on the GPU providers too (else on the CPU only)
    # (precision, config) -> the model opened, computing in that precision.
    open: Callable[[str, RuntimeConfig], Backend]
    # What ``model_precision=auto`` means for it when pinned: given whether bf16 may be and can
    # be computed here, the precision to ask for ("auto": it picks the file's variant itself).
    auto_precision: Callable[[bool], str]
    unavailable: Callable[[str], str | None]  # why it cannot compute a precision here, or None
    require: Callable[[str], None]  # raises ModelError, naming the settings, where it cannot
    copies: Callable[[RuntimeConfig], int]  # copies of the weights it holds, opened
    version: Callable[[], str]  # its build, which the tuning cache keys its timings by
