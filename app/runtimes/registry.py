"""The runtimes the server knows (``RUNTIMES``: one entry per runtime module), and which runtime and
precision serve a model on this machine (``backend``, ``model_precision``, ``bf16`` settings;
docs/backends.md).

An explicit setting is obeyed or fails at start-up in one line. ``auto`` on the CPU tries each
candidate that computes answers of the file's grade (an fp32 file: ONNX Runtime fp32, OpenVINO
fp32, OpenVINO bf16 where the CPU has it; the int8 file: both runtimes), times each on one warm
batch, and serves the fastest that passes the file's reference check (app.runtimes.base),
ONNX Runtime unless another is at least ``MARGIN`` faster: a CPU without bf16, where the two
fp32 runtimes are within noise of each other, keeps serving exactly as before. The check runs
in that order of preference, so a candidate that would lose anyway is never checked; the
chosen one is checked again at warm-up, on the bound buffers it then serves from (another path
through the runtime than these unbound runs). Every
candidate's timing or the reason it was skipped is logged and kept (``Backend.choice``), for
/v1/model and the page. The others are let go before the chosen one serves, so no second copy of
the weights stays resident for nothing. On a GPU, ONNX Runtime serves (OpenVINO here is CPU only).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from app.runtimes import onnxruntime, openvino
from app.runtimes.base import NO_REFERENCE, Backend, Runtime
from app.runtimes.config import RuntimeConfig
from app.runtimes.onnxruntime import OnnxModel
from core.contract import ModelMetadata
from core.errors import ModelError

log = logging.getLogger(__name__)

# Best first when they tie. The first is the reference: every file must load on it, and another
# replaces it only when at least MARGIN faster.
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (onnxruntime.RUNTIME, openvino.RUNTIME)}
ONNXRUNTIME, OPENVINO = onnxruntime.RUNTIME.name, openvino.RUNTIME.name
REFERENCE = ONNXRUNTIME
MARGIN = 1.10  # how much faster than the reference another candidate must be to replace it
TIMED_RUNS = 3  # warm runs of the timed batch per candidate; their median counts
TIMED_BATCH = 8  # the batch timed: the largest bucket when it is smaller


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str  # fp32 | fp16 | bf16 | int8

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


def candidates(
    backend: str,
    precision: str,
    *,
    gpu: bool,
    bf16_allowed: bool,
    bf16_reason: str | None,
) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """What to try, best first, and what ``auto`` skipped with why, from what each registered
    runtime computes. ``bf16_reason``: why this machine cannot compute bf16 (None when it can).
    Raises ModelError for an explicit setting that cannot be served at all."""
    in_bf16 = [r for r in RUNTIMES.values() if "bf16" in r.precisions]
    pinned = RUNTIMES[backend] if backend != "auto" else None
    if precision == "bf16" and (gpu or (pinned is not None and pinned not in in_bf16)):
        where = "a GPU provider" if gpu else f"backend={backend}"
        raise ModelError(
            f"model_precision=bf16 is computed by {' or '.join(r.title for r in in_bf16)} on "
            f"the CPU, not by {where}: set RESNET_SERVE_BACKEND={in_bf16[0].name} (or auto) "
            "and RESNET_SERVE_PROVIDERS=cpu"
        )
    if pinned is not None:
        return [Candidate(backend, _pinned(pinned, precision, gpu, bf16_allowed, bf16_reason))], []
    if gpu or precision == "fp16":  # fp16 files are for GPUs: the runtimes that serve on one
        return [Candidate(r.name, precision) for r in RUNTIMES.values() if r.gpu][:1], []
    if precision == "bf16":
        return [Candidate(in_bf16[0].name, "bf16")], []
    grade = "fp32" if precision == "auto" else precision
    tried = [Candidate(r.name, grade) for r in RUNTIMES.values() if grade in r.precisions]
    skipped = []
    for runtime in in_bf16 if precision == "auto" else ():
        candidate = Candidate(runtime.name, "bf16")
        if not bf16_allowed:
            skipped.append((candidate, "bf16 is off (RESNET_SERVE_BF16=false)"))
        elif bf16_reason is not None:
            skipped.append((candidate, bf16_reason))
        else:
            tried.append(candidate)
    return tried, skipped


def _pinned(
    runtime: Runtime, precision: str, gpu: bool, bf16_allowed: bool, bf16_reason: str | None
) -> str:
    """The precision a pinned ``backend`` is asked for; raises where it cannot serve at all."""
    if gpu and not runtime.gpu:
        on_gpu = next(r.name for r in RUNTIMES.values() if r.gpu)
        raise ModelError(
            f"backend={runtime.name} serves on the CPU, but the providers setting plans a GPU: "
            f"set RESNET_SERVE_PROVIDERS=cpu, or RESNET_SERVE_BACKEND={on_gpu} for the GPU"
        )
    if precision == "auto":
        return runtime.auto_precision(bf16_allowed and bf16_reason is None)
    if precision not in runtime.precisions:  # fp16, on a runtime that serves the CPU only
        raise ModelError(
            f"{precision} files are for GPUs: on backend={runtime.name} use "
            f"{', '.join(runtime.precisions)}"
        )
    return precision


def open_model(config: RuntimeConfig) -> Backend:
    """The backend that serves ``config``, opened; its ``choice`` says what else was tried."""
    tried, skipped = plan(config)
    if len(tried) == 1 and not skipped:
        model = open_candidate(tried[0], config)  # checked at warm-up, as every version
        # What it computes, not the setting: "auto" resolves to the file's precision here.
        model.choice = (_entry(Candidate(model.backend, model.precision), chosen=True),)
        return model
    failed: list[tuple[Candidate, str]] = []
    speeds, kept = _time_each(tried, config, failed)
    chosen = _first_checked(speeds, kept, config, failed)
    failed.sort(key=lambda item: tried.index(item[0]))
    if chosen is None:
        raise ModelError("; ".join(f"{c}: {why}" for c, why in failed))
    for candidate, why in skipped:  # not for this machine or these settings
        log.info("backend candidate skipped", extra={"candidate": str(candidate), "why": why})
    for candidate, why in failed:  # it should have worked: worth a look
        log.warning("backend candidate failed", extra={"candidate": str(candidate), "why": why})
    candidate, model = chosen
    why_not = dict(failed)
    model.choice = tuple(
        _entry(c, images_per_s=speeds.get(c), skipped=why_not.get(c), chosen=c == candidate)
        for c in tried
    ) + tuple(_entry(c, skipped=why) for c, why in skipped)
    log.info(
        "backend chosen",
        extra={"candidate": str(candidate), "images_per_s": round(speeds[candidate], 2)},
    )
    return model


Opened = tuple[Candidate, Backend]


def _time_each(
    tried: list[Candidate], config: RuntimeConfig, failed: list[tuple[Candidate, str]]
) -> tuple[dict[Candidate, float], Opened | None]:
    """Each candidate's images per second, and the fastest in preference, still open."""
    speeds: dict[Candidate, float] = {}
    kept: Opened | None = None
    for candidate in tried:
        try:
            model = open_candidate(candidate, config)
        except ModelError as exc:
            if candidate.backend == REFERENCE:
                # The runtime every file must load on: its failure is the file's, or the
                # settings', and trying another runtime on it would only add noise.
                raise
            failed.append((candidate, str(exc)))
            continue
        try:
            speeds[candidate] = _time(model, config)
        except ModelError as exc:  # rows out of shape or range: no reference could pass
            model.close()
            failed.append((candidate, str(exc)))
            continue
        log.info(
            "backend candidate timed",
            extra={"candidate": str(candidate), "images_per_s": round(speeds[candidate], 2)},
        )
        # One copy held beside the reference's at most (peak_copies): the others go now.
        if _ranked(speeds)[0] == candidate:
            if kept is not None:
                kept[1].close()
            kept = (candidate, model)
        else:
            model.close()
    return speeds, kept


def _first_checked(
    speeds: dict[Candidate, float],
    kept: Opened | None,
    config: RuntimeConfig,
    failed: list[tuple[Candidate, str]],
) -> Opened | None:
    """The file's reference check, in order of preference: the first to pass serves, and the
    ones behind it are never checked (each check is some 30 single-image runs)."""
    for candidate in _ranked(speeds):
        try:
            model = (
                kept[1]
                if kept is not None and kept[0] == candidate
                else open_candidate(candidate, config)
            )
        except ModelError as exc:
            failed.append((candidate, str(exc)))
            continue
        try:
            model.check_reference()
        except ModelError as exc:
            model.close()
            failed.append((candidate, str(exc)))
            continue
        return candidate, model
    return None


def open_candidate(candidate: Candidate, config: RuntimeConfig) -> Backend:
    """One candidate, opened as ``open_model`` opens it (benchmarks.backends measures them)."""
    model = RUNTIMES[candidate.backend].open(candidate.precision, config)
    model.reference_check = config.reference_check
    if config.reference_check and model.metadata.reference is None:
        raise ModelError(NO_REFERENCE)  # now, not at warm-up: one line at start-up
    return model


def plan(config: RuntimeConfig) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """``candidates`` for ``config`` on this machine."""
    gpu = config.providers.gpu
    in_bf16 = [r for r in RUNTIMES.values() if "bf16" in r.precisions]
    bf16_reason = None if gpu else in_bf16[0].unavailable("bf16")
    return candidates(
        config.backend, config.precision, gpu=gpu, bf16_allowed=config.bf16, bf16_reason=bf16_reason
    )


def peak_copies(config: RuntimeConfig) -> int:
    """The most copies of the weights ``open_model`` holds at once: the first candidate's (two
    ONNX Runtime sessions for ``adaptive`` on the CPU), plus the one being timed beside it."""
    tried, _ = plan(config)
    first = RUNTIMES[tried[0].backend].copies(config)
    others = [RUNTIMES[c.backend].copies(config) for c in tried[1:]]
    return first + max(others, default=0)


def check_model(config: RuntimeConfig) -> ModelMetadata:
    """What a supervisor checks before its workers start: the settings can be served here (an
    explicit backend or precision that this machine cannot run is one line now), and the file,
    on the reference runtime (``OnnxModel.check``)."""
    tried, _ = plan(config)
    if len(tried) == 1:
        RUNTIMES[tried[0].backend].require(tried[0].precision)
    file_precision = "fp32" if config.precision == "bf16" else config.precision
    metadata = OnnxModel.check(replace(config, precision=file_precision))
    if config.reference_check and metadata.reference is None:
        raise ModelError(NO_REFERENCE)
    return metadata


def _ranked(speeds: dict[Candidate, float]) -> list[Candidate]:
    """Best first: the fastest, but the reference runtime ahead of any other less than MARGIN
    faster."""
    reference = max((s for c, s in speeds.items() if c.backend == REFERENCE), default=0.0)

    def preference(candidate: Candidate) -> tuple[bool, float]:
        speed = speeds[candidate]
        return candidate.backend == REFERENCE or speed >= reference * MARGIN, speed

    return sorted(speeds, key=preference, reverse=True)


def _time(model: Backend, config: RuntimeConfig) -> float:
    """Images per second of one warm batch, after its rows pass ``check_rows``."""
    batch = min(TIMED_BATCH, config.largest_batch)
    model.check_rows(min(2, batch))
    size = model.metadata.recipe.crop_size
    images = np.zeros((batch, size, size, 3), dtype=np.uint8)
    model.run(images)  # the first run of a shape plans it
    seconds = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        model.run(images)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def _entry(
    candidate: Candidate,
    *,
    images_per_s: float | None = None,
    skipped: str | None = None,
    chosen: bool = False,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"backend": candidate.backend, "precision": candidate.precision}
    if images_per_s is not None:
        entry["images_per_s"] = round(images_per_s, 2)
    if skipped is not None:
        entry["skipped"] = skipped
    entry["chosen"] = chosen
    return entry
