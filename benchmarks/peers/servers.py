"""How each server is started, watched (CPU and memory of its whole process tree) and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
SERVERS = ("ours", "handwritten", "litserve", "bentoml", "rayserve")


@dataclass(frozen=True)
class Batching:
    """What every batching server is given.

    The batch size is ours' default. The peers' wait is 2 ms, a small timeout as their batching
    guides show (a window of 0 would turn LitServe's and Ray's batching off); ours runs with its
    own default, work-conserving batching (``max_wait_ms=0``), unless ``--batch-wait-ms`` is given.
    """

    max_batch_size: int = Settings.model_fields["max_batch_size"].default
    wait_ms: float = 2.0
    ours_wait_ms: float | None = None


def command(server: str, port: int) -> list[str]:
    peers_python = str(PEERS_VENV / "bin" / "python")
    modules = {
        "handwritten": "benchmarks.peers.handwritten",
        "litserve": "benchmarks.peers.litserve_server",
        "rayserve": "benchmarks.peers.rayserve_app",
    }
    if server == "ours":
        return [sys.executable, "-m", "app"]
    if server == "bentoml":
        service = "benchmarks.peers.bentoml_service:ImageClassifier"
        bentoml = str(PEERS_VENV / "bin" / "bentoml")
        return [bentoml, "serve", service, "--host", "127.0.0.1", "--port", str(port)]
    return [peers_python, "-m", modules[server]]


def environment(
    server: str, model: Path, port: int, batching: Batching, home: Path
) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if server == "ours":
        return env | {
            "RESNET_SERVE_MODEL_PATH": str(model),
            "RESNET_SERVE_HOST": "127.0.0.1",
            "RESNET_SERVE_PORT": str(port),
            "RESNET_SERVE_LOG_LEVEL": "warning",
            "RESNET_SERVE_GRPC_PORT": "0",  # HTTP is what is compared
            "RESNET_SERVE_MAX_BATCH_SIZE": str(batching.max_batch_size),
            **(
                {"RESNET_SERVE_MAX_WAIT_MS": str(batching.ours_wait_ms)}
                if batching.ours_wait_ms is not None
                else {}
            ),
        }
    return env | {
        "PEER_MODEL_PATH": str(model),
        "PEER_PORT": str(port),
        "PEER_MAX_BATCH_SIZE": str(batching.max_batch_size),
        "PEER_BATCH_WAIT_MS": str(batching.wait_ms),
        # Each run starts from a clean home; nothing is sent anywhere.
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


class ProcessTree:
    """A server process and everything it started: CPU snapshots and sampled memory.

    Memory is summed over the tree twice: RSS (what ``ps`` shows; a page shared by several
    processes counts once in each) and PSS (a shared page is split between its users), so a
    multi-process server is not charged twice for the same library pages.
    """

    SAMPLE_S = 0.5

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self._seen: dict[int, psutil.Process] = {pid: self._root}
        self._lock = threading.Lock()  # the sampler thread and the event loop both look
        self.samples: list[tuple[float, int, int]] = []  # (time, rss, pss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def members(self) -> list[psutil.Process]:
        """Every process of the tree alive now, including orphans it left behind."""
        with self._lock:
            with suppress(psutil.Error):
                for child in self._root.children(recursive=True):
                    self._seen.setdefault(child.pid, child)
            seen = list(self._seen.values())
        return [p for p in seen if _alive(p)]

    def cpu(self) -> dict[int, float]:
        out = {}
        for process in self.members():
            with suppress(psutil.Error):
                times = process.cpu_times()
                out[process.pid] = times.user + times.system
        return out

    def peak_mib(self, start: float, end: float) -> tuple[float | None, float | None]:
        inside = [(rss, pss) for t, rss, pss in self.samples if start <= t <= end]
        if not inside:
            return None, None
        return max(r for r, _ in inside) / 2**20, max(p for _, p in inside) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            rss = pss = 0
            for process in self.members():
                with suppress(psutil.Error):
                    info = process.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
            self.samples.append((time.perf_counter(), rss, pss))

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server, then SIGKILL to whatever of its tree is left."""
        self._stop.set()
        members = self.members()
        with suppress(psutil.Error):
            self._root.send_signal(signal.SIGTERM)
        psutil.wait_procs([self._root], timeout=grace_s)
        for process in members:
            with suppress(psutil.Error):
                if _alive(process):
                    process.kill()
        psutil.wait_procs(members, timeout=10)
        self._thread.join()


def _alive(process: psutil.Process) -> bool:
    # is_running() also checks the create time, so a reused pid is not mistaken for ours.
    with suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    tree: ProcessTree
    url: str
    log: Path
    started: float


def start(
    server: str,
    model: Path,
    port: int,
    batching: Batching,
    workdir: Path,
    settings: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> Server:
    """``settings``: environment variables on top (benchmarks.compare: ours with other settings);
    ``prefix``: a command the server runs under (benchmarks.workers: ``taskset``)."""
    home = Path(tempfile.mkdtemp(prefix=f"{server}-", dir=workdir))
    log = home / "server.log"
    env = environment(server, model, port, batching, home) | dict(settings or {})
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*prefix, *command(server, port)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Server(
        server, process, ProcessTree(process.pid), f"http://127.0.0.1:{port}/predict", log, started
    )


def log_tail(server: Server, lines: int = 30) -> str:
    text = server.log.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
