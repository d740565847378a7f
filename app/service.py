"""The inference pipeline every API calls: decode -> batch -> probabilities -> top-k.

Like MLServer's DataPlane: ``/predict`` and the Open Inference Protocol endpoints share this one
object, so limits, batching, metrics and errors cannot drift between them. HTTP stays in routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from app.batcher import Batcher
from app.errors import InvalidParameter
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.schemas import Prediction
from app.session import OnnxModel
from core.contract import ModelMetadata
from core.errors import InvalidImage, ServiceError
from core.preprocess import Limits, decode


@dataclass(frozen=True)
class Image:
    """One encoded image from a request; ``name`` (a filename, a tensor index) labels errors."""

    name: str | None
    data: bytes


class Classifier:
    def __init__(
        self,
        model: OnnxModel,
        batcher: Batcher,
        decoder: Executor,
        lifecycle: Lifecycle,
        metrics: Metrics,
        *,
        limits: Limits,
        default_top_k: int,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.lifecycle = lifecycle
        self._decoder = decoder
        self._metrics = metrics
        self._limits = limits
        self._default_top_k = default_top_k

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold an admission slot while a request's uploads are read and classified."""
        with self.lifecycle.admit():
            yield

    def top_k_or_default(self, top_k: int | None) -> int:
        num_classes = self.metadata.num_classes
        if top_k is None:
            return min(self._default_top_k, num_classes)
        if not 1 <= top_k <= num_classes:
            raise InvalidParameter(f"top_k={top_k} is out of range 1..{num_classes} (the classes)")
        return top_k

    async def classify(self, images: Sequence[Image]) -> list[np.ndarray]:
        """Probabilities float32[C] per encoded image, in order."""
        loop = asyncio.get_running_loop()
        decoding = [loop.run_in_executor(self._decoder, self._decode, i.data) for i in images]
        decoded = await asyncio.gather(*decoding, return_exceptions=True)
        for index, (result, image) in enumerate(zip(decoded, images, strict=True)):
            if isinstance(result, ServiceError):
                name = f" ({image.name!r})" if image.name is not None else ""
                raise type(result)(f"image {index}{name}: {result.message}", headers=result.headers)
            if isinstance(result, BaseException):
                raise result
        return await self.batcher.submit(decoded)  # type: ignore[arg-type]

    async def infer(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for already preprocessed uint8[S, S, 3] crops."""
        return await self.batcher.submit(crops)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        # Stable sort: equal scores list the lower class id first, deterministically.
        order = np.argsort(-probabilities, kind="stable")[:k]
        labels = self.metadata.labels
        return [
            Prediction(label=labels[i], class_id=int(i), score=float(probabilities[i]))
            for i in order
        ]

    def _decode(self, data: bytes) -> np.ndarray:
        started = time.perf_counter()
        try:
            return decode(data, self.metadata.recipe, self._limits)
        except ServiceError:
            raise
        except Exception as exc:
            # Untrusted bytes can trip any decoder bug; that is the image's fault, never a 500.
            raise InvalidImage(f"cannot decode the image: {exc!r}") from exc
        finally:
            self._metrics.preprocess_seconds.observe(time.perf_counter() - started)
