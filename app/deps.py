"""The ``Annotated`` aliases through which handlers reach what ``create_app`` put on app.state.

The getters are ``async def`` so FastAPI calls them inline instead of in its thread pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.service import Classifier
from app.uploads import UploadLimits


async def _classifier(request: Request) -> Classifier:
    classifier: Classifier = request.app.state.classifier
    return classifier


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


ClassifierDep = Annotated[Classifier, Depends(_classifier)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]


async def _upload_limits(request: Request) -> UploadLimits:
    limits: UploadLimits = request.app.state.upload_limits
    return limits


UploadLimitsDep = Annotated[UploadLimits, Depends(_upload_limits)]
