"""Several worker processes on one port (``RESNET_SERVE_WORKERS``), so that HTTP parsing and
decoding use every core: each worker is a whole server (its own ONNX Runtime session, batcher and
admission) and the kernel hands each new connection to a worker that is accepting.

The supervisor (this process) binds the port, starts the workers, and then only watches:
- a worker accepts nothing until it is warm (see ``create_app``), so the port is served by warm
  workers only; it tells the supervisor when it starts accepting;
- a worker that dies after that is replaced (its live gauges are dropped from ``/metrics``);
  one that dies before it ever accepted would fail again the same way, so the whole server
  stops, exit 1;
- SIGTERM or SIGINT: each worker turns ``/readyz`` to 503, stops accepting, finishes what it
  has, and exits; the supervisor exits 0 once all have exited 0;
- SIGHUP: with key files or a model repository, passed on (each worker re-reads its keys and
  loads what changed in the repository); without, a stop like SIGTERM;
- the keys' rate limits live in shared memory the supervisor makes (app.edge.limits), so they
  hold for the whole server;
- a repository load or unload asked of one worker is relayed to every worker (app.repository.link);
  a rollout's start and end too, and the supervisor judges its figures (every worker's);
- a worker whose supervisor has gone (SIGKILL) drains and exits by itself.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead

from app.edge.access import KeyFileError
from app.edge.limits import SharedTable
from app.process.cpus import pin_worker
from app.process.server import Server, uvicorn_config
from app.repository.link import STARTED, Change, Outcome, WorkerLink
from app.repository.rollout import Judge, Status, Tally
from app.settings import Settings
from app.telemetry.logs import configure_logging
from core.errors import ModelError

log = logging.getLogger(__name__)

# Workers are spawned, not forked: the supervisor has loaded ONNX Runtime, whose threads and
# locks do not survive a fork.
_spawn = multiprocessing.get_context("spawn")
# Builds a worker's app from its settings and cores (app.main.open_app); spawned workers get it
# by reference, so it must be a module-level function.
Build = Callable[[Settings, int | None], FastAPI]


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection  # app.repository.link; the worker sees EOF when the supervisor dies
    started: bool = False


@dataclass
class _Relay:
    """A repository change on its way through every worker, for the one that was asked."""

    asked: _Worker | None  # None: the supervisor's own change (a rollback)
    ident: int | None
    change: Change
    waiting: set[int]  # the workers whose outcome is still to come
    outcomes: list[Outcome] = field(default_factory=list)


def supervise(settings: Settings, build: Build) -> int:
    """Serve with ``settings.workers`` processes until stopped; returns the exit status."""
    try:
        reserved = _reserve(settings.host, settings.port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        print(f"resnet-serve: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    # prometheus_client picks its multiprocess mode when imported: the workers import it after
    # this, and a fresh directory holds no counts from an earlier run.
    metrics_dir = tempfile.mkdtemp(prefix="resnet-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    previous_wakeup = signal.set_wakeup_fd(wake_write.fileno())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _noted)
    try:
        return _Supervisor(settings, build, reserved, wake_read, metrics_dir).run()
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        wake_read.close()
        wake_write.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _noted(sig: int, frame: FrameType | None) -> None:
    """Signals are read from the wakeup socket by the supervisor's loop."""


def _reserve(host: str, port: int) -> socket.socket:
    """The port, checked free and then held for the workers' sockets (see ``_socket``).

    The check is a plain bind, which fails while anyone listens there, even the workers of
    another server that would otherwise share the port with ours in silence. The held socket is
    bound, never listening, so the kernel gives it no connections.
    """
    with _socket(host, reuse_port=False) as probe:
        probe.bind((host, port))
        port = probe.getsockname()[1]
    reserved = _socket(host, reuse_port=True)
    reserved.bind((host, port))
    return reserved


def _socket(host: str, reuse_port: bool) -> socket.socket:
    # SO_REUSEPORT: every worker listens on a socket of its own on the same port, and the kernel
    # spreads new connections evenly over the listening ones (by a hash of the addresses). One
    # shared socket would leave it to whichever worker wakes first, which took all 16 keep-alive
    # connections of a burst in benchmarks.workers.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


class _Supervisor:
    def __init__(
        self,
        settings: Settings,
        build: Build,
        reserved: socket.socket,
        wake: socket.socket,
        metrics_dir: str,
    ) -> None:
        self.settings = settings
        self.build = build
        self.reserved = reserved
        self.port: int = reserved.getsockname()[1]
        self.wake = wake
        self.metrics_dir = metrics_dir
        self.workers: list[_Worker] = []
        self.relays: dict[int, _Relay] = {}
        self.relay_ids = itertools.count()
        # Each model's last change, and its rollout's, for the workers started after them.
        self.changes: dict[str, Change] = {}
        # Each model's last rollout, judged on every worker's tallies (app.repository.link).
        self.judges: dict[str, Judge] = {}
        # The keys' rate limits, in shared memory: they hold for the server, not per worker.
        self.rate_limits = SharedTable(_spawn)

    def run(self) -> int:
        log.info(
            "starting workers",
            extra={"workers": self.settings.workers, "host": self.settings.host, "port": self.port},
        )
        self.workers = [self._start(index) for index in range(self.settings.workers)]
        while True:
            waiting: list[Connection | socket.socket | int] = [self.wake]
            for worker in self.workers:
                waiting += [worker.process.sentinel, worker.conn]
            for ready in wait(waiting):
                if ready is self.wake:
                    if self._on_signals():
                        return self._stop()
                    continue
                owner = self._owner(ready)
                if owner is None or (ready is owner.conn and self._on_message(owner)):
                    continue
                if not self._on_exit(owner):
                    self._stop()
                    return 1
                # A replacement may reuse the closed handles' numbers: wait afresh.
                break

    def _start(self, index: int) -> _Worker:
        ours, theirs = _spawn.Pipe()
        process = _spawn.Process(
            target=serve_worker,
            args=(self.settings, self.build, index, self.port, theirs, self.rate_limits),
            name=f"resnet-serve-worker-{index}",
        )
        process.start()
        theirs.close()
        for change in self.changes.values():  # applied before the worker accepts
            ours.send(("apply", None, replace(change, counted=False)))
        return _Worker(index, process, ours)

    def _owner(self, ready: object) -> _Worker | None:
        for worker in self.workers:
            if ready in (worker.process.sentinel, worker.conn):
                return worker
        return None

    def _on_signals(self) -> bool:
        """True when the server should stop."""
        signals = self.wake.recv(64)
        if signal.SIGHUP in signals:
            settings = self.settings
            keys = (settings.api_keys_file, settings.metrics_api_keys_file)
            reloads = any(keys) or settings.repository_api_keys_file or settings.model_repository
            if not reloads:
                return True
            for worker in self.workers:
                _send(worker, signal.SIGHUP)
        return signal.SIGTERM in signals or signal.SIGINT in signals

    def _on_message(self, worker: _Worker) -> bool:
        """True for a message; False when the worker closed its end (it is exiting)."""
        try:
            message = worker.conn.recv()
        except EOFError:
            return False
        if message == STARTED:
            worker.started = True
            log.info("worker started", extra={"worker": worker.index, "pid": worker.process.pid})
            return True
        kind, ident, body = message
        if kind == "relay":
            self._relay(worker, ident, body)
        elif kind == "applied":
            self._applied(worker.index, ident, body)
        elif kind == "tally":
            self._tally(*body)
        elif kind == "rollout":
            judge = self.judges.get(body)
            worker.conn.send(("done", ident, judge.state() if judge is not None else None))
        return True

    def _keep(self, change: Change) -> None:
        key = f"{change.name}/rollout" if change.plan is not None else change.name
        if change.action == "unload":
            self.changes.pop(f"{change.name}/rollout", None)
        self.changes.pop(key, None)
        self.changes[key] = change

    def _relay(self, asked: _Worker | None, ident: int | None, change: Change) -> None:
        """``asked``: the worker to answer, None for the supervisor's own change."""
        self._keep(change)
        number = next(self.relay_ids)
        live = [w for w in self.workers if w.process.exitcode is None]
        # A starting worker applies it too, but answers only for the started ones.
        relay = _Relay(asked, ident, change, {w.index for w in live if w.started})
        self.relays[number] = relay
        counting = next((w for w in live if w.started), None) if asked is None else None
        for worker in live:
            worker.conn.send(("apply", number, replace(change, counted=worker is counting)))
        self._answer_if_complete(number)

    def _tally(self, name: str, ident: str, tally: Tally) -> None:
        judge = self.judges.get(name)
        if judge is None or judge.plan.ident != ident:
            return  # an earlier rollout's
        verdict = judge.add(tally)
        if verdict is None:
            return
        judge.end(Status.ROLLED_BACK, verdict)
        log.warning("rollout rolled back", extra=judge.plan.describe() | {"reason": verdict})
        change = Change(Status.ROLLED_BACK.value, name, plan=judge.plan, reason=verdict)
        self._relay(None, None, change)

    def _applied(self, index: int, number: int, outcome: Outcome) -> None:
        relay = self.relays.get(number)
        if relay is not None and index in relay.waiting:
            relay.waiting.discard(index)
            relay.outcomes.append(outcome)
            self._answer_if_complete(number)

    def _answer_if_complete(self, number: int) -> None:
        relay = self.relays[number]
        if relay.waiting:
            return
        del self.relays[number]
        change = relay.change
        if change.plan is not None and not any(o.error for o in relay.outcomes):
            if change.action == "rollout":
                self.judges[change.name] = Judge(change.plan)
            elif (judge := self.judges.get(change.name)) and judge.plan.ident == change.plan.ident:
                judge.end(Status(change.action), change.reason)
        asked = relay.asked
        live = asked is not None and any(w is asked for w in self.workers)
        if asked is not None and live and asked.process.exitcode is None:
            asked.conn.send(("done", relay.ident, relay.outcomes))

    def _on_exit(self, worker: _Worker) -> bool:
        """Replaces a worker that died while serving; False when it never started."""
        worker.process.join()
        details = {"worker": worker.index, "pid": worker.process.pid}
        details["exitcode"] = worker.process.exitcode
        worker.conn.close()
        worker.process.close()
        mark_process_dead(details["pid"], self.metrics_dir)  # type: ignore[no-untyped-call]
        place = self.workers.index(worker)
        for number, relay in list(self.relays.items()):  # it answers for no change now
            relay.waiting.discard(worker.index)
            self._answer_if_complete(number)
        if not worker.started:
            log.error("worker exited before it served; stopping", extra=details)
            del self.workers[place]
            return False
        log.error("worker exited; starting a new one", extra=details)
        self.workers[place] = self._start(worker.index)
        return True

    def _stop(self) -> int:
        log.info("stopping workers", extra={"workers": len(self.workers)})
        self.reserved.close()
        for worker in self.workers:
            _send(worker, signal.SIGTERM)
        status = 0
        for worker in self.workers:
            worker.process.join()
            worker.conn.close()
            if worker.process.pid is not None:
                mark_process_dead(worker.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if worker.process.exitcode != 0:
                status = 1
        log.info("stopped", extra={"exitcode": status})
        return status


def _send(worker: _Worker, sig: int) -> None:
    if worker.process.pid is not None and worker.process.exitcode is None:
        os.kill(worker.process.pid, sig)


def serve_worker(
    settings: Settings,
    build: Build,
    index: int,
    port: int,
    conn: Connection,
    rate_limits: SharedTable,
) -> None:
    """One worker process: its own session, app, socket and uvicorn server on the port; the
    rate limits in the supervisor's ``rate_limits``."""
    # Until uvicorn takes the signals over (and after, when it re-raises the one that stopped
    # it), a stop signal ends the worker quietly with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_quietly)
    # First, so that every thread the worker starts inherits its cores.
    cores = pin_worker(index, settings.workers) if settings.pin_workers else None
    configure_logging(settings.log_level, worker=index)
    if cores is not None:
        log.info("worker pinned", extra={"cores": cores})
    link = WorkerLink(conn, index)
    link.start()
    try:
        # Bound now; listening (so given connections) only once uvicorn has run the lifespan,
        # which in a worker ends after the warm-up.
        listener = _socket(settings.host, reuse_port=True)
        listener.bind((settings.host, port))
        app = build(settings, len(cores) if cores is not None else None)
    except (OSError, ModelError, KeyFileError) as exc:
        print(f"resnet-serve: worker {index}: {exc}", file=sys.stderr)
        sys.exit(1)
    service = app.state.service
    service.link = link
    service.rate_limits.share(rate_limits)
    server = Server(uvicorn_config(settings, app), service, on_started=lambda: link.send(STARTED))
    server.run(sockets=[listener])
    if not server.started:
        sys.exit(1)


def _exit_quietly(sig: int, frame: FrameType | None) -> None:
    sys.exit(0)
