"""Heads: what a request wants from each image's row of model outputs, applied by the pipeline
after the batch ran (app.pipeline.pipeline).

A head is built per request from its parameters, so a bad parameter (``top_k`` out of range) is
refused before any work, and the pipeline's answer is already the head's. It reads the outputs it
needs by name from each image's row: ``Classify`` the probabilities. A head for another output
(embeddings, explanations) is one more class here, the route or protocol output that builds it,
and the output in the contract (core.contract.SERVED_OUTPUTS), which every runtime then computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from app.errors import InvalidParameter
from core.contract import OUTPUT_NAME, ModelMetadata

T_co = TypeVar("T_co", covariant=True)


# One image's row of each named output of the model (core.contract.SERVED_OUTPUTS).
Row = Mapping[str, np.ndarray]


class Head(Protocol[T_co]):
    def __call__(self, row: Row) -> T_co:
        """One image's answer from its row of the model's outputs."""


class Ranked(NamedTuple):
    """One of an image's top-k classes."""

    label: str
    class_id: int
    score: float


def rows(row: Row) -> Row:
    """The row itself: the protocol answers with the outputs asked for, each as it is or
    ranked."""
    return row


class Classify:
    """The k best classes of an image, best first; equal scores list the lower class id first."""

    def __init__(self, metadata: ModelMetadata, top_k: int | None, default_top_k: int) -> None:
        """``top_k``: the request's (None: ``default_top_k``, at most the classes); raises
        InvalidParameter out of 1..classes."""
        classes = len(metadata.labels)
        if top_k is None:
            top_k = min(default_top_k, classes)
        elif not 1 <= top_k <= classes:
            raise InvalidParameter(f"top_k={top_k} is out of range 1..{classes} (the classes)")
        self.k = top_k
        self.labels = metadata.labels

    def __call__(self, row: Row) -> list[Ranked]:
        return self.ranked(row[OUTPUT_NAME])

    def ranked(self, probabilities: np.ndarray) -> list[Ranked]:
        labels = self.labels
        order = np.argsort(-probabilities, kind="stable")[: self.k].tolist()
        scores = probabilities[order].tolist()
        return [Ranked(labels[i], i, score) for i, score in zip(order, scores, strict=True)]
