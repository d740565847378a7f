"""Which runtime and precision serve a model on this machine (``backend``, ``model_precision``,
``bf16`` settings; docs/backends.md).

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
import onnxruntime as ort

from app.runtimes import openvino
from app.runtimes.base import NO_REFERENCE, Backend
from app.runtimes.onnxruntime import OnnxModel, SessionConfig
from app.runtimes.providers import GPU, choose_providers
from core.contract import ModelMetadata
from core.errors import ModelError

log = logging.getLogger(__name__)

ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
MARGIN = 1.10  # how much faster than ONNX Runtime another candidate must be to replace it
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
    """What to try, best first, and what ``auto`` skipped with why. ``bf16_reason``: why this
    machine cannot compute bf16 (None when it can). Raises ModelError for an explicit setting
    that cannot be served at all."""
    if precision == "bf16" and (gpu or backend == ONNXRUNTIME):
        where = "a GPU provider" if gpu else "backend=onnxruntime"
        raise ModelError(
            f"model_precision=bf16 is computed by OpenVINO on the CPU, not by {where}: set "
            "RESNET_SERVE_BACKEND=openvino (or auto) and RESNET_SERVE_PROVIDERS=cpu"
        )
    if backend == OPENVINO and gpu:
        raise ModelError(
            "backend=openvino serves on the CPU, but the providers setting plans a GPU: set "
            "RESNET_SERVE_PROVIDERS=cpu, or RESNET_SERVE_BACKEND=onnxruntime for the GPU"
        )
    if backend == OPENVINO and precision == "fp16":
        raise ModelError("fp16 files are for GPUs: on backend=openvino use fp32, bf16 or int8")
    if backend == ONNXRUNTIME or gpu or precision == "fp16":
        return [Candidate(ONNXRUNTIME, precision)], []
    file_precision = "fp32" if precision in ("auto", "bf16") else precision
    if backend == OPENVINO:
        if precision == "auto":
            bf16 = bf16_allowed and bf16_reason is None
            return [Candidate(OPENVINO, "bf16" if bf16 else "fp32")], []
        return [Candidate(OPENVINO, precision)], []
    if precision == "bf16":
        return [Candidate(OPENVINO, "bf16")], []
    tried = [Candidate(ONNXRUNTIME, file_precision), Candidate(OPENVINO, file_precision)]
    skipped = []
    if precision == "auto":
        in_bf16 = Candidate(OPENVINO, "bf16")
        if not bf16_allowed:
            skipped.append((in_bf16, "bf16 is off (RESNET_SERVE_BF16=false)"))
        elif bf16_reason is not None:
            skipped.append((in_bf16, bf16_reason))
        else:
            tried.append(in_bf16)
    return tried, skipped


def open_model(config: SessionConfig) -> Backend:
    """The backend that serves ``config``, opened; its ``choice`` says what else was tried."""
    tried, skipped = _plan(config)
    if len(tried) == 1 and not skipped:
        model = open_candidate(tried[0], config)  # checked at warm-up, as every version
        # What it computes, not the setting: "auto" resolves to the file's precision here.
        model.choice = (_entry(Candidate(model.backend, model.precision), chosen=True),)
        return model
    failed: list[tuple[Candidate, str]] = []
    speeds: dict[Candidate, float] = {}
    kept: tuple[Candidate, Backend] | None = None  # the first in preference so far, still open
    for candidate in tried:
        try:
            model = open_candidate(candidate, config)
        except ModelError as exc:
            if candidate.backend == ONNXRUNTIME:
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
        # One copy held beside ONNX Runtime's at most (peak_copies): the others go now.
        if _ranked(speeds)[0] == candidate:
            if kept is not None:
                kept[1].close()
            kept = (candidate, model)
        else:
            model.close()
    # The file's reference check, in order of preference: the first to pass serves, and the
    # ones behind it are never checked (each check is some 30 single-image runs).
    chosen: tuple[Candidate, Backend] | None = None
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
        chosen = (candidate, model)
        break
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


def _ranked(speeds: dict[Candidate, float]) -> list[Candidate]:
    """Best first: the fastest, but ONNX Runtime ahead of any other less than MARGIN faster."""
    onnxruntime = max((s for c, s in speeds.items() if c.backend == ONNXRUNTIME), default=0.0)

    def preference(candidate: Candidate) -> tuple[bool, float]:
        speed = speeds[candidate]
        return candidate.backend == ONNXRUNTIME or speed >= onnxruntime * MARGIN, speed

    return sorted(speeds, key=preference, reverse=True)


def peak_copies(config: SessionConfig) -> int:
    """The most copies of the weights ``open_model`` holds at once: ONNX Runtime's sessions (two
    for ``adaptive`` on the CPU), plus the candidate being timed beside the best one so far."""
    tried, _ = _plan(config)
    if all(c.backend == OPENVINO for c in tried):
        return 1
    onnxruntime = 2 if config.spinning == "adaptive" else 1
    return onnxruntime + (1 if len(tried) > 1 else 0)


def open_candidate(candidate: Candidate, config: SessionConfig) -> Backend:
    """One candidate, opened as ``open_model`` opens it (benchmarks.backends measures them)."""
    model: Backend
    if candidate.backend == ONNXRUNTIME:
        model = OnnxModel.load(replace(config, precision=candidate.precision))
    else:
        model = openvino.OpenVinoModel.load(
            config.model_path,
            candidate.precision,
            lanes=config.lanes,
            threads=config.alone_threads,
        )
    model.reference_check = config.reference_check
    if config.reference_check and model.metadata.reference is None:
        raise ModelError(NO_REFERENCE)  # now, not at warm-up: one line at start-up
    return model


def _time(model: Backend, config: SessionConfig) -> float:
    """Images per second of one warm batch, after its rows pass ``check_rows``."""
    batch = min(TIMED_BATCH, config.gpu.batch_range[1])
    model.check_rows(min(2, batch))
    size = model.metadata.recipe.crop_size
    images = np.zeros((batch, size, size, 3), dtype=np.uint8)
    model.predict(images)  # the first run of a shape plans it
    seconds = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        model.predict(images)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def _plan(config: SessionConfig) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """``candidates`` for ``config`` on this machine."""
    try:
        chosen, _ = choose_providers(config.providers, ort.get_available_providers())
        gpu = chosen[0] in GPU
    except ModelError:  # no acceptable provider: OnnxModel.load says so in its own words
        gpu = False
    return candidates(
        config.backend,
        config.precision,
        gpu=gpu,
        bf16_allowed=config.bf16,
        bf16_reason=None if gpu else openvino.unavailable("bf16"),
    )


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


def check_model(config: SessionConfig) -> ModelMetadata:
    """What a supervisor checks before its workers start: the settings can be served here (an
    explicit backend or precision that this machine cannot run is one line now), and the file
    (``OnnxModel.check``)."""
    tried, _ = _plan(config)
    if len(tried) == 1 and tried[0].backend == OPENVINO:
        openvino.require(tried[0].precision)
    file_precision = "fp32" if config.precision == "bf16" else config.precision
    metadata = OnnxModel.check(replace(config, precision=file_precision))
    if config.reference_check and metadata.reference is None:
        raise ModelError(NO_REFERENCE)
    return metadata
