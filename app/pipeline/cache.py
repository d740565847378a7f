"""Answers kept for images seen before (``RESNET_SERVE_CACHE_BYTES``; docs/api.md, "Repeated
images"): a repeated image is answered without being decoded or computed.

An answer is one image's answer from one head, kept under the image bytes' digest, the model
version that computed it (name, version, precision) and the head with its parameters: a request
of another version (a swap, a rollout's other side), another endpoint or other parameters never
gets it. Least recently used answers go first once the answers' bytes reach the budget. Each
worker has its own.

With a Redis the replicas share (``RESNET_SERVE_REDIS_URL``, app.store.redis), an image this
worker has not seen is looked up there too, one round trip for a request's images, and what a
worker computes is written there in the background (expiring after ``redis_cache_ttl_s``;
Redis's own maxmemory policy bounds it). The version's identity is then its file's digest, not
its path, so replicas serving the same file share answers and no two files ever do. Answers
travel as JSON with arrays as raw bytes, never pickled: whoever can write to Redis must not be
able to run code in the server. If Redis fails, the local cache goes on alone.

The transport learns how a request's images fared (``seen``) and says so (``X-Cache``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson
from redis.asyncio import Redis

from app.pipeline.heads import Explained, Heatmap, Ranked
from app.store.redis import PREFIX, SharedRedis
from app.telemetry.metrics import Metrics

# What a key costs beside its answer: the digest, the tuple, the dict's slot.
ENTRY_OVERHEAD = 200
# Larger answers (a big heatmap) are not written to the shared cache: a round trip of them
# would cost about what computing them does.
SHARED_MAX_BYTES = 1 << 20


@dataclass
class Seen:
    """A request's images answered from the cache (``hits``) and computed (``misses``)."""

    hits: int = 0
    misses: int = 0

    @property
    def header(self) -> str | None:
        """``X-Cache``: hit, miss or partial; None where the cache was not asked."""
        if not self.hits and not self.misses:
            return None
        return "hit" if not self.misses else "miss" if not self.hits else "partial"


# Set by the transport per request; the pipeline counts into it.
seen: ContextVar[Seen | None] = ContextVar("resnet_serve_cache_seen", default=None)


class AnswerCache:
    def __init__(
        self,
        budget_bytes: int,
        metrics: Metrics,
        shared: SharedRedis | None = None,
        ttl_s: int = 3600,
    ) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self.shared = shared
        self.ttl_s = ttl_s
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._metrics = metrics
        self._writes: set[asyncio.Task[None]] = set()  # held until done
        metrics.track(metrics.cache_bytes, lambda: self.bytes)

    @staticmethod
    def key(data: bytes, version: Hashable, head: Hashable) -> Hashable:
        """``version``: the computing version's identity; ``head``: the head's, parameters and
        all. BLAKE2b: several times faster than SHA-256 here, and as collision-resistant."""
        return (hashlib.blake2b(data, digest_size=20).digest(), version, head)

    def get(self, key: Hashable) -> Any | None:
        """The answer kept here, or None; a hit is counted (a miss only once the shared cache,
        if any, has been asked too: ``missed``)."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        self._metrics.cache_hits.inc()
        return found[0]

    def missed(self, images: int) -> None:
        self._metrics.cache_misses.inc(images)

    async def get_shared(self, keys: Sequence[Hashable]) -> list[Any | None]:
        """The shared cache's answers for ``keys`` (None for each it lacks, or all of them when
        there is none or it fails); each one found is kept here too."""
        if self.shared is None:
            return [None] * len(keys)
        names = [_shared_name(key) for key in keys]
        found = await self.shared.call("cache", lambda client: client.mget(names))
        if found is None:
            return [None] * len(keys)
        answers = [None if raw is None else decode_answer(raw) for raw in found]
        for key, answer in zip(keys, answers, strict=True):
            if answer is not None:
                self._metrics.cache_hits.inc()
                self._metrics.cache_shared_hits.inc()
                self.put(key, answer, share=False)
        return answers

    def put(self, key: Hashable, answer: Any, share: bool = True) -> None:
        """Keep ``answer``; ``share``: write it to the shared cache too (in the background)."""
        size = answer_bytes(answer) + ENTRY_OVERHEAD
        if share and self.shared is not None and size <= SHARED_MAX_BYTES:
            self._share(key, answer)
        if size > self.budget // 4:  # one answer may not sweep a quarter of the rest away
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.bytes -= previous[1]
        self._entries[key] = (answer, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            self._metrics.cache_evictions.inc()

    def _share(self, key: Hashable, answer: Any) -> None:
        assert self.shared is not None
        shared, ttl_s = self.shared, self.ttl_s
        name, value = _shared_name(key), encode_answer(answer)

        async def write(client: Redis) -> None:
            await client.set(name, value, ex=ttl_s)

        async def writing() -> None:
            await shared.call("cache", write)

        task = asyncio.get_running_loop().create_task(writing())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def __len__(self) -> int:
        return len(self._entries)


def _shared_name(key: Hashable) -> str:
    """The Redis key of an answer: the local key is bytes, strings, numbers and tuples of them,
    whose repr is the same in every process."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=20).hexdigest()
    return f"{PREFIX}answer:{digest}"


# The answers' own types, by name: the only classes a shared answer may become.
_TUPLES: dict[str, type[NamedTuple]] = {t.__name__: t for t in (Ranked, Heatmap, Explained)}
_NUMERIC = frozenset("biuf")  # numpy dtype kinds an array may have


def encode_answer(answer: Any) -> bytes:
    return orjson.dumps(_tree(answer))


def _tree(answer: Any) -> Any:
    if isinstance(answer, np.ndarray):
        data = base64.b64encode(np.ascontiguousarray(answer).tobytes()).decode()
        return {"array": [answer.dtype.str, list(answer.shape), data]}
    if isinstance(answer, tuple) and type(answer).__name__ in _TUPLES:
        return {"tuple": [type(answer).__name__, [_tree(item) for item in answer]]}
    if isinstance(answer, list | tuple):
        return [_tree(item) for item in answer]
    if isinstance(answer, dict):
        return {"map": {str(name): _tree(value) for name, value in answer.items()}}
    return answer  # str, int, float, bool, None


def decode_answer(raw: bytes | str) -> Any:
    """The answer ``raw`` holds, or None for anything that is not one of ours."""
    try:
        return _untree(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError):
        return None


def _untree(tree: Any) -> Any:
    if isinstance(tree, list):
        return [_untree(item) for item in tree]
    if not isinstance(tree, dict):
        return tree
    ((kind, body),) = tree.items()
    if kind == "array":
        dtype, shape, data = np.dtype(body[0]), tuple(body[1]), base64.b64decode(body[2])
        if dtype.kind not in _NUMERIC:
            raise ValueError(f"not a numeric array: {dtype}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if kind == "tuple":
        return _TUPLES[body[0]](*(_untree(item) for item in body[1]))
    if kind == "map":
        return {name: _untree(value) for name, value in body.items()}
    raise ValueError(f"unknown kind {kind!r}")


def answer_bytes(answer: Any) -> int:
    """About what ``answer`` holds in memory: arrays by their buffers, text by its length,
    containers by their items."""
    if isinstance(answer, np.ndarray):
        return int(answer.nbytes) + 112
    if isinstance(answer, str | bytes):
        return len(answer) + 50
    if isinstance(answer, int | float) or answer is None:
        return 32
    if isinstance(answer, dict):
        return 64 + sum(answer_bytes(k) + answer_bytes(v) for k, v in answer.items())
    if isinstance(answer, tuple | list):  # NamedTuples too
        return 56 + sum(answer_bytes(item) for item in answer)
    return 64
