"""The request pipeline every protocol calls: admission -> decode -> batch -> run -> head.

Like MLServer's DataPlane: ``/predict``, the Open Inference Protocol over REST and over gRPC share
this one object per model version, so limits, batching, metrics and errors cannot drift between
them. A transport hands it encoded images (or preprocessed crops) and a head (app.pipeline.heads),
which turns each image's row of model outputs into its answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from opentelemetry.trace import SpanContext

from app.batching.admission import Admission, CostEstimate
from app.batching.batcher import Batcher
from app.batching.deadline import deadline
from app.errors import DeadlineExceeded, OutputUnavailable
from app.pipeline.cache import AnswerCache, seen
from app.pipeline.heads import Head, Row, Size
from app.process.memory import TRIM_ABOVE_PIXELS, release_all
from app.runtimes.base import Backend
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import NO_TRACING, Tracing, current, now_ns
from core.contract import CLASSIFY, OUTPUT_NAME, ModelMetadata
from core.errors import InvalidImage, ServiceError, TooManyPixels
from core.preprocess import Decoded, Limits, decode_cost, decode_counted

T = TypeVar("T")
# Images up to this size are hashed for the cache on the event loop (BLAKE2b: about 0.1 ms a MB
# here); larger ones on a decode thread.
HASH_INLINE_BYTES = 256 * 1024
# Called with a request's crops and rows once the model answered, before its head reads them: a
# rollout compares them with another version's (app.repository.route). The rows carry the
# probabilities whatever the head reads.
Tap = Callable[[Sequence[np.ndarray], Sequence[Row]], None]


@dataclass(frozen=True)
class Image:
    """One encoded image from a request; ``name`` (a filename, a tensor index) labels errors."""

    name: str | None
    data: bytes


@dataclass(frozen=True)
class UploadLimits:
    """What one request may bring, checked by each transport as it reads the images."""

    max_image_bytes: int
    max_images_per_request: int


@dataclass(frozen=True)
class PipelineConfig:
    limits: Limits  # per image: pixels, formats
    max_request_pixels: int
    request_timeout_ms: float


class Pipeline:
    def __init__(
        self,
        model: Backend,
        batcher: Batcher,
        decoder: Executor,
        admission: Admission,
        metrics: Metrics,
        config: PipelineConfig,
        estimate: CostEstimate | None = None,
        tracing: Tracing = NO_TRACING,
        cache: AnswerCache | None = None,
        identity: Hashable = None,
    ) -> None:
        """``estimate``: this model version's cost per image, learned from its batches;
        ``cache``: answers for repeated images, kept under ``identity`` (the version's: its
        name, version, precision and file) with the head's."""
        self.model = model
        self.cache = cache
        self.identity = identity
        self.batcher = batcher
        self.admission = admission
        self.estimate = estimate or CostEstimate()
        self.config = config
        self.metadata: ModelMetadata = model.metadata
        self._recipe = model.metadata.recipe
        self._decoder = decoder
        self._metrics = metrics
        self._inline = batcher.inline
        self._tracing = tracing

    async def images(
        self, images: Sequence[Image], head: Head[T], tap: Tap | None = None
    ) -> list[T]:
        """The head's answer for each encoded image, in order: from the cache for an image seen
        before (app.pipeline.cache), computed for the rest.

        A request decodes one image at a time, so it holds at most one decode thread: a request
        of many large images cannot queue ahead of everyone else's. Its pixel budget is checked
        from the headers before anything is decoded.
        """
        self._check_outputs(head)
        cache = self.cache
        if cache is None:
            return await self._computed(images, range(len(images)), head, tap)
        keys = [await self._key(cache, image, head) for image in images]
        answers: list[T | None] = [cache.get(key) for key in keys]
        missing = [index for index, answer in enumerate(answers) if answer is None]
        if missing and cache.shared is not None:
            shared = await cache.get_shared([keys[index] for index in missing])
            for index, answer in zip(missing, shared, strict=True):
                answers[index] = answer
            missing = [index for index in missing if answers[index] is None]
        cache.missed(len(missing))
        counted = seen.get()
        if counted is not None:
            counted.hits += len(images) - len(missing)
            counted.misses += len(missing)
        if missing:
            chosen = [images[index] for index in missing]
            computed = await self._computed(chosen, missing, head, tap)
            for index, answer in zip(missing, computed, strict=True):
                cache.put(keys[index], answer)
                answers[index] = answer
        return answers  # type: ignore[return-value]  # every None was computed

    async def _key(self, cache: AnswerCache, image: Image, head: Head[Any]) -> Hashable:
        if len(image.data) <= HASH_INLINE_BYTES:
            return cache.key(image.data, self.identity, head.cache_key)
        return await self._run(cache.key, image.data, self.identity, head.cache_key)

    async def _computed(
        self, images: Sequence[Image], numbers: Sequence[int], head: Head[T], tap: Tap | None
    ) -> list[T]:
        """``images`` decoded and computed; ``numbers``: their places in the request, which
        their errors name."""
        with self.admission.work(len(images), self.estimate):
            until = self._deadline()
            self._check_deadline(until, "no image was decoded")
            if len(images) > 1:  # one image is bounded by max_image_pixels <= the budget
                await self._run(self._check_budget, images)
            decoded: list[Decoded] = []
            # Decodes run on other threads: their spans name the request's span themselves.
            parent = current() if self._tracing.on else None
            for index, image in zip(numbers, images, strict=True):
                self._check_deadline(until, f"image {index} was not decoded")
                if self._decodes_inline(image, len(images)):
                    decoded.append(self._decode_labelled(index, image, parent))
                else:
                    decoded.append(await self._run(self._decode_labelled, index, image, parent))
            crops = [each.crop for each in decoded]
            rows = await self._submit(crops, until, head, tap)
        return await self._answers(head, rows, [each.size for each in decoded])

    async def crops(
        self, crops: Sequence[np.ndarray], head: Head[T], tap: Tap | None = None
    ) -> list[T]:
        """The head's answer for each already preprocessed uint8[S, S, 3] crop."""
        self._check_outputs(head)
        with self.admission.work(len(crops), self.estimate):
            rows = await self._submit(crops, self._deadline(), head, tap)
        return await self._answers(head, rows, [None] * len(rows))

    async def probabilities(
        self, crops: Sequence[np.ndarray] | None, images: Sequence[Image]
    ) -> np.ndarray:
        """Each image's class probabilities [N, C], from its crop when ``crops`` are given (made
        by the same recipe), else decoded here: a rollout's comparison (app.repository.route),
        which no client waits for, so it is not admitted and counts in no client's budget."""
        if crops is None:
            decoded = [await self._run(self._decode_labelled, i, im) for i, im in enumerate(images)]
            crops = [each.crop for each in decoded]
        server_only = asyncio.get_running_loop().time() + self.config.request_timeout_ms / 1000
        rows = await self.batcher.submit(crops, server_only, CLASSIFY)
        return np.stack([row[OUTPUT_NAME] for row in rows])

    async def _submit(
        self, crops: Sequence[np.ndarray], until: float, head: Head[Any], tap: Tap | None
    ) -> Sequence[Row]:
        outputs = head.outputs | CLASSIFY if tap is not None else head.outputs
        rows = await self.batcher.submit(crops, until, outputs, head.class_id)
        if tap is not None:
            tap(crops, rows)
        return rows

    def _check_outputs(self, head: Head[Any]) -> None:
        missing = head.outputs - self.model.outputs
        if missing:
            raise OutputUnavailable(
                f"model {self.metadata.name!r} version {self.metadata.version!r} has no output "
                f"{', '.join(map(repr, sorted(missing)))}: its file was exported before it "
                "(re-export it with python -m model export, or model build)"
            )

    async def _answers(self, head: Head[T], rows: Sequence[Row], sizes: list[Size]) -> list[T]:
        if head.offload:  # a PNG per image: not on the event loop
            return await self._run(_apply, head, rows, sizes)
        return _apply(head, rows, sizes)

    def _deadline(self) -> float:
        """The server's request_timeout_ms from now, or the client's own deadline if sooner."""
        server = asyncio.get_running_loop().time() + self.config.request_timeout_ms / 1000
        own = deadline.get()
        return server if own is None else min(server, own)

    def _check_deadline(self, until: float, what: str) -> None:
        if asyncio.get_running_loop().time() >= until:
            self._metrics.deadline_dropped.labels("decode").inc()
            timeout = self.config.request_timeout_ms
            raise DeadlineExceeded(
                f"{what} before the deadline (request_timeout_ms={timeout:g}, or the request's "
                "own timeout if sooner)"
            )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    def _check_budget(self, images: Sequence[Image]) -> None:
        recipe, limits = self._recipe, self.config.limits
        total = 0
        for index, image in enumerate(images):
            total += _labelled(index, image, decode_cost, image.data, recipe, limits)
        if total > self.config.max_request_pixels:
            raise TooManyPixels(
                f"the request's {len(images)} images decode to {total} pixels, over "
                f"max_request_pixels={self.config.max_request_pixels}"
            )

    def _decode_labelled(
        self, index: int, image: Image, parent: SpanContext | None = None
    ) -> Decoded:
        started, started_ns = time.perf_counter(), now_ns() if parent is not None else 0
        decoded: Decoded | None = None
        error: str | None = None
        try:
            decoded = _labelled(index, image, self._decode, image.data)
            return decoded
        except ServiceError as exc:
            error = exc.message
            raise
        finally:
            self._metrics.preprocess_seconds.observe(time.perf_counter() - started)
            if parent is not None:
                self._trace_decode(index, image, decoded, started_ns, parent, error)

    def _trace_decode(
        self,
        index: int,
        image: Image,
        decoded: Decoded | None,
        started_ns: int,
        parent: SpanContext,
        error: str | None,
    ) -> None:
        attributes: dict[str, str | int] = {
            "resnet_serve.image.index": index,
            "resnet_serve.image.bytes": len(image.data),
        }
        if decoded is not None:
            attributes["resnet_serve.image.format"] = decoded.format
            attributes["resnet_serve.image.pixels"] = decoded.pixels
            attributes["resnet_serve.image.draft_scale"] = decoded.scale
        self._tracing.stage("decode", started_ns, now_ns(), attributes, parent=parent, error=error)

    def _decode(self, data: bytes) -> Decoded:
        started = time.perf_counter()
        decoded = decode_counted(data, self._recipe, self.config.limits)
        self._inline.decoded(decoded.pixels, time.perf_counter() - started)
        if decoded.pixels > TRIM_ABOVE_PIXELS:  # app.process.memory
            release_all()
        return decoded

    def _decodes_inline(self, image: Image, images: int) -> bool:
        """Whether this request has the server to itself and ``image`` is predicted to decode
        within ``inline_max_ms`` (app.batching.lanes)."""
        if not self._inline.max_ms or not self.batcher.alone(images):
            return False
        try:
            pixels = decode_cost(image.data, self._recipe, self.config.limits)
        except Exception:  # a bad image fails on the decode thread, as any other does
            return False
        return self._inline.decodes(pixels)


def _apply(head: Head[T], rows: Sequence[Row], sizes: list[Size]) -> list[T]:
    return [head(row, size) for row, size in zip(rows, sizes, strict=True)]


def _labelled(index: int, image: Image, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, its errors naming the image; any decoder failure is the image's fault."""
    name = f" ({image.name!r})" if image.name is not None else ""
    try:
        return fn(*args)
    except ServiceError as exc:
        raise type(exc)(f"image {index}{name}: {exc.message}", headers=exc.headers) from exc
    except Exception as exc:
        # Untrusted bytes can trip any decoder bug: never a 500.
        raise InvalidImage(f"image {index}{name}: cannot decode the image: {exc!r}") from exc
