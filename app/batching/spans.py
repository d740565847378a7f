"""A batch's spans (docs/tracing.md): the batch's own, linked to each traced request in it; and in
each such request, its wait in the queue and its share of the run, linked back to the batch. The
batcher calls it only for a batch that holds a traced request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext

from app.telemetry.tracing import Tracing, now_ns

log = logging.getLogger("app.batching.batcher")


class Queued(Protocol):
    """A queued image, as far as its spans care: its request's span, and when it was queued."""

    trace: SpanContext | None
    enqueued_ns: int


class BatchSpans:
    def __init__(self, tracing: Tracing, described: Mapping[str, str]) -> None:
        """``described``: the batch spans' attributes (the model, its version, provider and
        precision)."""
        self._tracing = tracing
        self._described = dict(described)

    def record(
        self,
        lane: str,
        batch: Sequence[Queued],
        size: int,
        started_ns: int,
        error: str | None = None,
    ) -> None:
        traced = [item for item in batch if item.trace is not None]
        if not traced:
            return
        try:
            self._record(lane, traced, len(batch), size, started_ns, error)
        except Exception:  # tracing never fails a batch
            log.exception("tracing the batch failed")

    def _record(
        self,
        lane: str,
        traced: list[Queued],
        images: int,
        size: int,
        started_ns: int,
        error: str | None,
    ) -> None:
        ended_ns = now_ns()
        attributes = {
            **self._described,
            "resnet_serve.batch.size": images,
            "resnet_serve.batch.bucket": size,
            "resnet_serve.batch.padding": size - images,
            "resnet_serve.batch.lane": lane,
        }
        requests: dict[tuple[int, int], tuple[SpanContext, list[Queued]]] = {}
        for item in traced:
            assert item.trace is not None
            key = (item.trace.trace_id, item.trace.span_id)
            requests.setdefault(key, (item.trace, []))[1].append(item)
        span = self._tracing.stage(
            "batch",
            started_ns,
            ended_ns,
            attributes,
            parent=INVALID_SPAN_CONTEXT,  # a root of its own: it serves many traces
            links=[request for request, _ in requests.values()],
            error=error,
        )
        shared = [span] if span is not None else []
        for request, items in requests.values():
            queued = min(item.enqueued_ns for item in items)
            own = {"resnet_serve.images": len(items)}
            self._tracing.stage("queue", queued, started_ns, own, parent=request, links=shared)
            self._tracing.stage(
                "inference",
                started_ns,
                ended_ns,
                own,
                parent=request,
                links=shared,
                error=error,
            )
