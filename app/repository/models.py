"""The model versions being served, and how they change without a failed request.

Requests resolve a version here (``resolve``): the one asked for, or the newest ready version of
the model, of the default model when none is named (``default_model``, or the only model; with
several and none set, a request must name one). Changes happen on the event loop, one model at a
time (a lock per name), so a request sees either the old set or the new one:

- a new version is opened, warmed and checked beside those serving (``open_version``); only then
  is it added, and from that moment it takes the unversioned requests;
- a version taken out stops taking new requests at once and finishes what it admitted before its
  session goes;
- a version that fails to open or to warm never takes a request; the versions serving keep
  serving, and the failure is logged, counted and shown in the index. A load whose every new
  version failed takes nothing out, so a model that had a ready version still has one.

Where versions come from is a ``Source``: the repository folder (app.repository.sources), or the
one file of ``model_path``.

A rollout (app.repository.rollout, app.repository.route) pins the served version: requests that
name none go to its baseline (or a share to its candidate) whatever is newer, and both versions
stay loaded (the version policy ``specific:`` them) until it ends; then the model is pinned to
the version that won, until a load through the repository API or another rollout.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.errors import (
    ModelRequired,
    RepositoryUnavailable,
    RolloutConflict,
    RolloutNotFound,
    UnknownModel,
)
from app.process.memory import release_all
from app.repository.link import Change
from app.repository.policy import VersionPolicy
from app.repository.rollout import Judge, Plan, Status
from app.repository.route import Rollout, Route
from app.repository.sources import Signature, signature
from app.repository.version import ServedModel, State
from app.telemetry.metrics import Metrics
from core.errors import BadRequest, ModelError, ServiceError

log = logging.getLogger(__name__)

OpenVersion = Callable[[str, str, Path], Awaitable[ServedModel]]


class Source(Protocol):
    versioned: bool  # whether it holds numbered versions (a repository), not one file

    def names(self) -> list[str]:
        """The models there are."""

    def wanted(self, name: str, policy: VersionPolicy | None, settled: bool) -> dict[str, Path]:
        """The versions of ``name`` to serve (``policy``: a load's own), by version; raises
        UnknownModel for a model that is not there. ``settled``: only versions whose files have
        not changed since the last look (a poll)."""


@dataclass(frozen=True)
class Entry:
    """One row of the repository index."""

    name: str
    version: str
    state: State
    reason: str = ""


class Models:
    def __init__(
        self,
        source: Source,
        open_version: OpenVersion,
        metrics: Metrics,
        default: str | None = None,
    ) -> None:
        """``default``: the model requests naming none go to (the default_model setting)."""
        self.source = source
        self._open = open_version
        self._metrics = metrics
        self._default = default
        # Every model loaded and not unloaded, with its ready versions: none while its first
        # load runs, or when every version failed (it is still one of the models served).
        self._ready: dict[str, dict[str, ServedModel]] = {}
        self._loading: set[tuple[str, str]] = set()
        # What failed to load, with why, and the files it failed on: not retried by a poll
        # until they change.
        self._failed: dict[tuple[str, str], tuple[str, Signature | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # A load's own version policy, kept for the polls and reloads after it (Triton's config
        # override); a load that brings none goes back to the source's.
        self._policies: dict[str, VersionPolicy] = {}
        # The version requests naming none go to, where a rollout decided it (see above).
        self._pinned: dict[str, str] = {}
        self.rollouts: dict[str, Rollout | _Starting] = {}  # running, by model
        # Each model's last rollout, judged here (one worker) or by the supervisor (several:
        # ``judged`` False, and what this worker sees is sent there).
        self.judges: dict[str, Judge] = {}
        self.judged = True
        self._ending: set[asyncio.Task[None]] = set()

    @property
    def default_name(self) -> str | None:
        """The model requests naming none go to: the default_model setting, else the only model
        served. None with several served and no setting: never the first one loaded, which
        would change with the models beside it."""
        if self._default is not None:
            return self._default
        return next(iter(self._ready)) if len(self._ready) == 1 else None

    def default(self) -> str | None:
        """``default_name``; ModelRequired (400) when several models are served and none is
        the default."""
        if self.default_name is None and len(self._ready) > 1:
            raise ModelRequired(
                f"no model named, and this server has several ({sorted(self._ready)}) with no "
                "default: name one (model=NAME) or set RESNET_SERVE_DEFAULT_MODEL"
            )
        return self.default_name

    def resolve(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The version a request goes to (a rollout's baseline, for one naming none);
        UnknownModel (404) when there is none ready."""
        name = name or self.default()
        versions = self._ready.get(name or "")
        if not versions:
            serving = sorted(n for n, v in self._ready.items() if v)
            raise UnknownModel(f"unknown model {name!r}: this server serves {serving}")
        if version is None:
            pinned = versions.get(self._pinned.get(name or "", ""))
            return pinned if pinned is not None else versions[newest(list(versions))]
        served = versions.get(version)
        if served is None:
            raise UnknownModel(
                f"unknown version {version!r} of model {name!r}: ready versions are "
                f"{sorted(versions, key=_order)}"
            )
        return served

    def route(self, name: str | None, version: str | None, who: str) -> Route:
        """Where a request goes: ``resolve``'s version, or, in a rollout and naming no version,
        the one its canary picks (``who``: the caller, for a sticky one)."""
        served = self.resolve(name, version)
        rollout = self.rollouts.get(served.name) if version is None else None
        if not isinstance(rollout, Rollout) or not rollout.routing:
            return Route(served)
        role = rollout.pick(who)
        return Route(rollout.served(role), rollout, role)

    def ready(self) -> list[ServedModel]:
        return [served for versions in self._ready.values() for served in versions.values()]

    def versions(self, name: str) -> list[str]:
        return sorted(self._ready.get(name, {}), key=_order)

    def index(self) -> list[Entry]:
        entries = {(s.name, s.version): Entry(s.name, s.version, s.state) for s in self.ready()}
        for key in self._loading:
            entries.setdefault(key, Entry(*key, State.LOADING))
        for key, (reason, _) in self._failed.items():
            entries.setdefault(key, Entry(*key, State.UNAVAILABLE, reason))
        named = {name for name, _ in entries}
        try:
            names = set(self.source.names())
        except RepositoryUnavailable:
            names = set()  # what is loaded is still listed, and serving
        for name in names - named:
            entries[(name, "")] = Entry(name, "", State.UNAVAILABLE, "not loaded")
        return [entries[key] for key in sorted(entries, key=lambda k: (k[0], _order(k[1])))]

    async def load(
        self, name: str, policy: VersionPolicy | None = None, *, polled: bool = False
    ) -> list[Entry]:
        """Bring ``name`` to the versions its policy wants: new ones warmed beside the serving
        ones and added, then the unwanted ones drained and taken out; the versions that failed.
        ``policy``: this load's own, kept for later loads (None: the source's from now on).
        ``polled``: only versions whose files have settled, and not again those that failed on
        the same files."""
        async with self._lock(name):
            if policy is None:
                self._policies.pop(name, None)
            else:
                self._policies[name] = policy
            wanted = self.source.wanted(name, policy, settled=polled)
            current = self._ready.setdefault(name, {})
            for version, path in wanted.items():
                if version not in current:
                    await self._add(name, version, path, retry=not polled)
            # Only once a wanted version is ready: a load whose new versions all failed leaves
            # the serving ones serving.
            if set(wanted) & set(current):
                for version in [v for v in current if v not in wanted]:
                    await self._take_out(name, version)
            return [
                Entry(name, version, State.UNAVAILABLE, self._failed[(name, version)][0])
                for version in wanted
                if (name, version) in self._failed
            ]

    async def unload(self, name: str) -> None:
        """Take every version of ``name`` out; each finishes what it admitted first."""
        async with self._lock(name):
            if name not in self._ready:
                raise UnknownModel(f"model {name!r} is not loaded")
            for version in list(self._ready[name]):
                await self._take_out(name, version)
            del self._ready[name]
            self._failed = {k: v for k, v in self._failed.items() if k[0] != name}
            self._policies.pop(name, None)

    async def apply(self, change: Change) -> list[tuple[str, str]]:
        """A repository change (app.repository.link): the versions that failed, with why."""
        if change.plan is not None:
            if change.action == "rollout":
                await self.start_rollout(change.plan)
            else:
                await self.end_rollout(change.plan, Status(change.action), change.reason)
                if change.counted:
                    self._metrics.rollout_ends.labels(change.name, change.action).inc()
            return []
        self._check_no_rollout(change.name)
        self._pinned.pop(change.name, None)  # the operator's own load decides from here on
        if change.action == "unload":
            await self.unload(change.name)
            return []
        policy = VersionPolicy.parse(change.policy) if change.policy is not None else None
        return [(e.version, e.reason) for e in await self.load(change.name, policy)]

    async def start_rollout(self, plan: Plan) -> None:
        """The candidate loaded beside the baseline (both then kept), compared, and routed to.
        Raises, with nothing changed, where it cannot start."""
        name = plan.model
        self._check_no_rollout(name)
        if not self.source.versioned:
            raise RolloutConflict("a rollout needs a model repository (model_repository)")
        self.resolve(name)  # 404 unless it serves
        both = (int(plan.baseline), int(plan.candidate))
        found = self.source.wanted(name, VersionPolicy("specific", versions=both), settled=False)
        if plan.candidate not in found:
            raise UnknownModel(f"version {plan.candidate} of {name!r} is not in the repository")
        kept = self._policies.get(name)
        # The baseline goes on answering, however new the rest. It is the version that served
        # where the rollout was asked for; a worker that serves another (started later, on the
        # newest) loads it, so every worker routes alike.
        self._pinned[name] = plan.baseline
        loaded = {int(v) for v in self.versions(name)}
        policy = VersionPolicy("specific", versions=tuple(sorted(set(both))))
        self.rollouts[name] = placeholder = _Starting(plan)
        try:
            failed = await self.load(name, policy)
            candidate = self._ready[name].get(plan.candidate)
            baseline = self._ready[name].get(plan.baseline)
            if failed or candidate is None or baseline is None:
                reasons = "; ".join(f"version {e.version}: {e.reason}" for e in failed)
                raise BadRequest(
                    f"the rollout of {name!r} could not load its versions "
                    f"({reasons or 'not in the repository'}); serving {self.versions(name)}"
                )
            if set(candidate.metadata.labels) != set(baseline.metadata.labels):
                raise RolloutConflict(
                    f"version {plan.candidate} of {name!r} has other classes than version "
                    f"{plan.baseline}: a rollout compares answers class by class"
                )
        except BaseException:
            if self.rollouts.get(name) is placeholder:
                del self.rollouts[name]
            if self._pinned.get(name) == plan.baseline:
                del self._pinned[name]
            # The candidate out again: back to the versions loaded before, under the same policy.
            await self.load(name, VersionPolicy("specific", versions=tuple(sorted(loaded))))
            if kept is None:
                self._policies.pop(name, None)
            else:
                self._policies[name] = kept
            raise
        rollout = Rollout(plan, baseline, candidate, self._metrics, lambda: self._judge(name))
        self.rollouts[name] = rollout
        self.judges[name] = Judge(plan)
        log.info("rollout started", extra=plan.describe())

    async def end_rollout(self, plan: Plan, status: Status, reason: str = "") -> None:
        """The rollout over: every request naming no version to the winner at once, the model
        pinned to it, and the loser unloaded. Applied where the rollout never ran here (a worker
        started later), it leaves the model as the others have it."""
        name = plan.model
        rollout = self.rollouts.get(name)
        if rollout is not None and rollout.plan.ident == plan.ident:
            rollout.routing = False
            del self.rollouts[name]
        judge = self.judges.get(name)
        if judge is not None and judge.plan.ident == plan.ident:
            judge.end(status, reason)
        winner = plan.candidate if status is Status.PROMOTED else plan.baseline
        self._pinned[name] = winner
        policy: VersionPolicy | None = VersionPolicy("specific", versions=(int(winner),))
        if status is Status.PROMOTED and winner in self.source.wanted(name, None, settled=False):
            policy = None  # the server's own policy serves it: no pin needed after a restart
        await self.load(name, policy)

    def rollout_state(self, name: str) -> dict[str, object]:
        judge = self.judges.get(name)
        if judge is None:
            raise RolloutNotFound(f"model {name!r} has had no rollout since the server started")
        return judge.state()

    def rollout(self, name: str) -> Plan:
        """The running rollout's plan; 409 where none runs."""
        rollout = self.rollouts.get(name)
        if not isinstance(rollout, Rollout) or not rollout.routing:  # starting, or ending
            raise RolloutConflict(f"no rollout of {name!r} is running")
        return rollout.plan

    def _check_no_rollout(self, name: str) -> None:
        running = self.rollouts.get(name)
        if running is not None:
            raise RolloutConflict(
                f"a rollout of {name!r} is running (candidate {running.plan.candidate}): "
                "promote it (POST .../rollout/promote) or stop it (DELETE .../rollout) first"
            )

    def _judge(self, name: str) -> None:
        """One worker: its figures judged as they come, and a failing candidate rolled back at
        once (several: the supervisor judges; app.repository.link)."""
        rollout, judge = self.rollouts.get(name), self.judges.get(name)
        if not self.judged or not isinstance(rollout, Rollout) or judge is None:
            return
        verdict = judge.add(rollout.take())
        if verdict is None:
            return
        rollout.routing = False  # from this request on: nothing changes for a client
        judge.end(Status.ROLLED_BACK, verdict)
        log.warning("rollout rolled back", extra=rollout.plan.describe() | {"reason": verdict})
        self._metrics.rollout_ends.labels(name, Status.ROLLED_BACK.value).inc()
        task = asyncio.get_running_loop().create_task(
            self.end_rollout(rollout.plan, Status.ROLLED_BACK, verdict)
        )
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def load_all(self, *, polled: bool = False) -> None:
        """Every model of the source, each to its policy (start-up, SIGHUP, a poll); a poll also
        unloads the models whose folder is gone."""
        try:
            names = self.source.names()
        except (ModelError, RepositoryUnavailable) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            log.error("the model source cannot be read", extra={"reason": reason})
            return
        for name in names:
            try:  # each model to the policy its last load brought, if any
                await self.load(name, self._policies.get(name), polled=polled)
            except ServiceError as exc:
                log.warning("model not loaded", extra={"model": name, "reason": exc.message})
        if polled:
            for name in [n for n in self._ready if n not in names]:
                await self.unload(name)

    async def close(self) -> None:
        for name in list(self._ready):
            async with self._lock(name):
                for version in list(self._ready[name]):
                    await self._take_out(name, version)

    async def _add(self, name: str, version: str, path: Path, *, retry: bool) -> None:
        files = signature(path) if path.parent.is_dir() else None
        failed = self._failed.get((name, version))
        if failed is not None and not retry and failed[1] == files:
            return
        self._loading.add((name, version))
        try:
            served = await self._open(name, version, path)
        except Exception as exc:
            reason = str(getattr(exc, "message", None) or exc) or type(exc).__name__
            self._failed[(name, version)] = (reason, files)
            self._metrics.model_loads.labels(name, "failed").inc()
            log.error(
                "model version failed to load; it takes no requests",
                extra={"model": name, "version": version, "path": str(path), "reason": reason},
            )
            return
        finally:
            self._loading.discard((name, version))
        self._failed.pop((name, version), None)
        self._ready[name][version] = served  # from here on it takes requests
        self._metrics.model_loads.labels(name, "ready").inc()
        log.info("serving", extra={"model": name, "version": version})

    async def _take_out(self, name: str, version: str) -> None:
        served = self._ready[name].pop(version)  # no new request reaches it from here on
        await served.stop()
        self._metrics.model_loads.labels(name, "unloaded").inc()
        del served
        gc.collect()  # its sessions sit in reference cycles (tasks, callbacks): free them now
        release_all()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


class _Starting:
    """A rollout being started: another is refused meanwhile; nothing is routed by it."""

    routing = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan


def newest(versions: list[str]) -> str:
    return max(versions, key=_order)


def _order(version: str) -> tuple[int, int | str]:
    """Numeric versions by number; others (a metadata version) after them, by text."""
    return (0, int(version)) if version.isdigit() else (1, version)
