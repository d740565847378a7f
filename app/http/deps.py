"""The ``Annotated`` aliases through which handlers reach what ``create_app`` put on app.state.

The getters are ``async def`` so FastAPI calls them inline instead of in its thread pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from app.batching.admission import Lifecycle, Ticket
from app.http.intake import TICKET_KEY
from app.http.uploads import UploadLimits
from app.repository.link import Change, Outcome
from app.repository.models import Models
from app.telemetry.metrics import Metrics


async def _models(request: Request) -> Models:
    models: Models = request.app.state.models
    return models


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


async def _repository_changes(request: Request) -> ChangeRepository:
    change: ChangeRepository = request.app.state.change_repository
    return change


ModelsDep = Annotated[Models, Depends(_models)]
# A repository change applied by every worker (app.repository.link); each one's outcome.
ChangeRepository = Callable[[Change], Awaitable[list[Outcome]]]
RepositoryChangesDep = Annotated[ChangeRepository, Depends(_repository_changes)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
LifecycleDep = Annotated[Lifecycle, Depends(_lifecycle)]


async def _upload_limits(request: Request) -> UploadLimits:
    limits: UploadLimits = request.app.state.upload_limits
    return limits


UploadLimitsDep = Annotated[UploadLimits, Depends(_upload_limits)]


async def _ticket(request: Request) -> Ticket | None:
    """The admission of an ``Access.INFERENCE`` request (app.http.intake); None elsewhere."""
    ticket: Ticket | None = request.scope.get("state", {}).get(TICKET_KEY)
    return ticket


TicketDep = Annotated[Ticket | None, Depends(_ticket)]
