"""One model served by two backends, each batch size by the one ``auto`` timed fastest for it
(app.runtimes.registry): ONNX Runtime fp32 for a lone image and OpenVINO bf16 for batches, say.

Both compute the same file and each passed the file's reference check in its own precision, so a
batch's answer is within that precision's bounds whichever computes it. The batcher, lanes and
warm-up see one backend: a batch goes to the part that serves its size, on the lane thread that
runs it (each part keeps its own per-thread buffers and infer requests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from app.runtimes.base import Backend, Outputs
from core.contract import CLASSIFY


class SplitModel(Backend):
    def __init__(self, by_size: Mapping[int, Backend]) -> None:
        """``by_size``: the backend for each batch size (a size not named goes to the next one
        named above it, or to the largest's)."""
        self._by_size = dict(sorted(by_size.items()))
        self.parts = list(dict.fromkeys(self._by_size.values()))  # in order of their sizes
        self.metadata = self.parts[0].metadata
        self.backend = _joined(part.backend for part in self.parts)
        self.provider = _joined(part.provider for part in self.parts)
        self.precision = _joined(part.precision for part in self.parts)
        self.outputs = frozenset.intersection(*(part.outputs for part in self.parts))
        self.shapes = self.parts[0].shapes

    def part(self, size: int) -> Backend:
        """The backend that computes a batch of ``size``."""
        found = self._by_size.get(size)
        if found is None:
            above = [named for named in self._by_size if named >= size]
            found = self._by_size[above[0] if above else max(self._by_size)]
        return found

    def sizes(self, part: Backend) -> list[int]:
        return [size for size, serving in self._by_size.items() if serving is part]

    def run(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        return self.part(len(images)).run(images, outputs, class_ids)

    def run_alone(
        self,
        images: np.ndarray,
        outputs: frozenset[str] = CLASSIFY,
        class_ids: np.ndarray | None = None,
    ) -> Outputs:
        return self.part(len(images)).run_alone(images, outputs, class_ids)

    @property
    def adaptive(self) -> bool:
        return any(part.adaptive for part in self.parts)

    def bind(self, buckets: Sequence[int]) -> None:
        super().bind(buckets)
        for part in self.parts:
            part.bind([bucket for bucket in buckets if self.part(bucket) is part])

    @property
    def warms_per_thread(self) -> bool:
        return any(part.warms_per_thread for part in self.parts)

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def describe(self) -> str:
        return ", ".join(
            f"{part.describe()} for batches of {size_ranges(part.buckets or self.sizes(part))}"
            for part in self.parts
        )

    def self_check(self, batch: int) -> None:
        """Each part's own: its rows at one of its buckets (two images or more where it has
        such a bucket, to show padding leaks), and the file's reference outputs."""
        for part in self.parts:
            sizes = part.buckets or (batch,)
            part.self_check(next((size for size in sizes if size >= 2), sizes[0]))

    def check_reference(self) -> None:
        for part in self.parts:
            part.check_reference()


def _joined(names: Iterable[str]) -> str:
    return "+".join(dict.fromkeys(names))


def size_ranges(sizes: Iterable[int]) -> str:
    """1-3, 8 for [1, 2, 3, 8]."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and size == runs[-1][-1] + 1:
            runs[-1].append(size)
        else:
            runs.append([size])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
