"""Answers kept for images seen before (``RESNET_SERVE_CACHE_BYTES``; docs/api.md, "Repeated
images"): a repeated image is answered without being decoded or computed.

An answer is one image's answer from one head, kept under the image bytes' digest, the model
version that computed it (name, version, precision) and the head with its parameters: a request
of another version (a swap, a rollout's other side), another endpoint or other parameters never
gets it. Least recently used answers go first once the answers' bytes reach the budget. Each
worker has its own.

The transport learns how a request's images fared (``seen``) and says so (``X-Cache``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.telemetry.metrics import Metrics

# What a key costs beside its answer: the digest, the tuple, the dict's slot.
ENTRY_OVERHEAD = 200


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
    def __init__(self, budget_bytes: int, metrics: Metrics) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._metrics = metrics
        metrics.track(metrics.cache_bytes, lambda: self.bytes)

    @staticmethod
    def key(data: bytes, version: Hashable, head: Hashable) -> Hashable:
        """``version``: the computing version's identity; ``head``: the head's, parameters and
        all. BLAKE2b: several times faster than SHA-256 here, and as collision-resistant."""
        return (hashlib.blake2b(data, digest_size=20).digest(), version, head)

    def get(self, key: Hashable) -> Any | None:
        found = self._entries.get(key)
        if found is None:
            self._metrics.cache_misses.inc()
            return None
        self._entries.move_to_end(key)
        self._metrics.cache_hits.inc()
        return found[0]

    def put(self, key: Hashable, answer: Any) -> None:
        size = answer_bytes(answer) + ENTRY_OVERHEAD
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

    def __len__(self) -> int:
        return len(self._entries)


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
