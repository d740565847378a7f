"""The runtimes the server knows (``RUNTIMES``: one entry per runtime module), and which runtime and
precision serve a model on this machine (``backend``, ``model_precision``, ``bf16`` settings;
docs/backends.md).

An explicit setting is obeyed or fails at start-up in one line. ``auto`` on the CPU tries each
candidate that computes answers of the file's grade (an fp32 file: ONNX Runtime fp32, OpenVINO
fp32, OpenVINO bf16 where the CPU has it; the int8 file: both runtimes) and times each on warm
batches of the smallest and the largest bucket (up to TIMED_BATCH). The largest batch is served by
the fastest there that passes the file's reference check (app.runtimes.base), ONNX Runtime unless
another is at least ``MARGIN`` faster: a CPU without bf16, where the two fp32 runtimes are within
noise of each other, keeps serving exactly as before. The smallest bucket is served by the
fastest there in the same way, and when that is another runtime (ONNX Runtime fp32 for a lone
image, OpenVINO bf16 for batches, say), each bucket goes to whichever of the two is preferred at
its size (``SplitModel``), once the second has passed its check and fits in the memory budget
beside the first. The checks run in order of preference, so a candidate that would lose anyway
is never checked; the chosen ones are checked again at warm-up, on the bound buffers they then
serve from (another path through the runtime than these unbound runs).

The timings are kept in the tuning cache (app.runtimes.tuning) and reused by every load of the
same file on the same kind of CPU, runtimes and threads: replicas choose alike, and start without
timing. Every candidate's timing or the reason it was skipped is logged and kept
(``Backend.choice``), for /v1/model and the page. The others are let go before the chosen ones
serve, so no copy of the weights stays resident for nothing. On a GPU, ONNX Runtime serves
(OpenVINO here is CPU only).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.process.memory import check_budget
from app.runtimes import onnxruntime, openvino, tuning
from app.runtimes.base import NO_REFERENCE, Backend, Runtime
from app.runtimes.config import RuntimeConfig
from app.runtimes.onnxruntime import OnnxModel
from app.runtimes.providers import CPU, model_file
from app.runtimes.split import SplitModel, size_ranges
from core.contract import ModelMetadata
from core.errors import ModelError

log = logging.getLogger(__name__)

# Best first when they tie. The first is the reference: every file must load on it, and another
# replaces it only when at least MARGIN faster.
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (onnxruntime.RUNTIME, openvino.RUNTIME)}
ONNXRUNTIME, OPENVINO = onnxruntime.RUNTIME.name, openvino.RUNTIME.name
REFERENCE = ONNXRUNTIME
MARGIN = 1.10  # how much faster than the reference another candidate must be to replace it
TIMED_RUNS = 3  # warm runs of each timed batch per candidate; their median counts
TIMED_BATCH = 8  # the largest batch timed: the largest bucket when it is smaller


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


def open_model(config: RuntimeConfig, budget_mib: int = 0) -> Backend:
    """The backend that serves ``config``, opened: one runtime, or two, each serving the batch
    sizes it is fastest at (``SplitModel``); its ``choice`` says what else was tried.
    ``budget_mib`` (0: none): a second runtime is opened only where its weights fit beside the
    first's."""
    tried, skipped = plan(config)
    if len(tried) == 1 and not skipped:
        model = open_candidate(tried[0], config)  # checked at warm-up, as every version
        # What it computes, not the setting: "auto" resolves to the file's precision here.
        model.choice = (_entry(Candidate(model.backend, model.precision), chosen=True),)
        return model
    failed: list[tuple[Candidate, str]] = []
    speeds, opened, cached = _timings(tried, config, failed)
    largest = _first_checked(_ranked(_at(speeds, config.buckets[-1])), opened, config, failed)
    lone, refused = (
        _lone(speeds, largest, opened, config, failed, budget_mib)
        if largest is not None
        else (None, None)
    )
    for candidate in [c for c in opened if c not in (largest, lone)]:
        opened.pop(candidate).close()
    failed.sort(key=lambda item: tried.index(item[0]))
    if largest is None or lone is None:
        raise ModelError("; ".join(f"{c}: {why}" for c, why in failed))
    for candidate, why in skipped:  # not for this machine or these settings
        log.info("backend candidate skipped", extra={"candidate": str(candidate), "why": why})
    for candidate, why in failed:  # it should have worked: worth a look
        log.warning("backend candidate failed", extra={"candidate": str(candidate), "why": why})
    serves = _serves(speeds, config.buckets, largest, lone)
    why_not = dict(failed)
    if refused is not None:
        why_not[refused[0]] = _refused(speeds, config.buckets, largest, *refused)
        log.warning("backend candidate refused", extra={"why": why_not[refused[0]]})
    model = (
        opened[largest]
        if lone == largest
        else SplitModel({bucket: opened[c] for bucket, c in serves.items()})
    )
    model.choice = tuple(
        _entry(
            c,
            images_per_s=speeds.get(c),
            skipped=why_not.get(c),
            batch_sizes=[b for b, serving in serves.items() if serving == c],
            cached=cached,
        )
        for c in tried
    ) + tuple(_entry(c, skipped=why) for c, why in skipped)
    log.info(
        "backend chosen",
        extra={
            "candidate": str(largest),
            "images_per_s": round(speeds[largest][max(speeds[largest])], 2),
            "batch_sizes": {
                str(c): size_ranges(b for b, s in serves.items() if s == c) for c in (lone, largest)
            },
            "timings": "cached" if cached else "measured",
        },
    )
    return model


Opened = dict[Candidate, Backend]
Speeds = dict[Candidate, dict[int, float]]  # images per second, by batch size timed


def _timings(
    tried: list[Candidate], config: RuntimeConfig, failed: list[tuple[Candidate, str]]
) -> tuple[Speeds, Opened, bool]:
    """Each candidate's timings, from the tuning cache where it holds them (then nothing is
    opened yet), else measured (the fastest at the largest batch still open) and stored;
    whether they came from the cache."""
    sizes = timed_sizes(config.buckets)
    if config.tuning == "off":
        return *_time_each(tried, config, failed, sizes), False
    path, entry_key = tuning_entry(config)
    with tuning.locked(path) as held:  # the replicas timing this key wait for the first one
        since = tuning.STARTED if config.tuning == "retime" else 0.0
        stored = tuning.load(path, entry_key, since=since)
        if stored is not None:
            log.info("backend timings reused", extra={"path": str(path)})
            return _from_stored(stored, tried, failed), {}, True
        speeds, opened = _time_each(tried, config, failed, sizes)
        if held:
            timings: tuning.Timings = {str(c): why for c, why in failed}
            tuning.store(path, entry_key, timings | {str(c): s for c, s in speeds.items()})
    return speeds, opened, False


def tuning_entry(config: RuntimeConfig) -> tuple[Path, dict[str, Any]]:
    """Where ``open_model`` keeps the timings of ``config``'s candidates, and their key."""
    tried, _ = plan(config)
    files = [model_file(config.model_path, _file_precision(c), CPU) for c in tried]
    entry_key = tuning.key(
        [file for file in files if file.is_file()],  # a missing one fails as it opens
        {c.backend: RUNTIMES[c.backend].version() for c in tried},
        _threads(config),
        [str(c) for c in tried],
        timed_sizes(config.buckets),
    )
    return tuning.entry_path(config.tuning_cache_dir, entry_key), entry_key


def _time_each(
    tried: list[Candidate],
    config: RuntimeConfig,
    failed: list[tuple[Candidate, str]],
    sizes: list[int],
) -> tuple[Speeds, Opened]:
    """Each candidate's images per second at each of ``sizes``, and the fastest in preference
    at the largest, still open."""
    speeds: Speeds = {}
    kept: Opened = {}
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
            speeds[candidate] = _time(model, sizes)
        except ModelError as exc:  # rows out of shape or range: no reference could pass
            model.close()
            failed.append((candidate, str(exc)))
            continue
        log.info(
            "backend candidate timed",
            extra={
                "candidate": str(candidate),
                "images_per_s": {size: round(s, 2) for size, s in speeds[candidate].items()},
            },
        )
        # One copy held beside the reference's at most (peak_copies): the others go now.
        if _ranked(_at(speeds, sizes[-1]))[0] == candidate:
            for other in list(kept):
                kept.pop(other).close()
            kept[candidate] = model
        else:
            model.close()
    return speeds, kept


def _from_stored(
    stored: tuning.Timings, tried: list[Candidate], failed: list[tuple[Candidate, str]]
) -> Speeds:
    speeds: Speeds = {}
    for candidate in tried:
        timed = stored.get(str(candidate))
        if isinstance(timed, str):
            retry = "RESNET_SERVE_TUNING=retime tries again"
            failed.append((candidate, f"{timed} (when timed, cached; {retry})"))
        elif timed:
            speeds[candidate] = timed
    return speeds


def _first_checked(
    ranking: list[Candidate],
    opened: Opened,
    config: RuntimeConfig,
    failed: list[tuple[Candidate, str]],
) -> Candidate | None:
    """The file's reference check, in order of preference: the first to pass is returned, open
    in ``opened``, and the ones behind it are never checked (each check is some 30 single-image
    runs). One that failed before is not tried again."""
    for candidate in ranking:
        if candidate in dict(failed):
            continue
        try:
            model = opened.get(candidate) or open_candidate(candidate, config)
        except ModelError as exc:
            failed.append((candidate, str(exc)))
            continue
        opened[candidate] = model
        try:
            model.check_reference()
        except ModelError as exc:
            opened.pop(candidate).close()
            failed.append((candidate, str(exc)))
            continue
        return candidate
    return None


def _lone(
    speeds: Speeds,
    largest: Candidate,
    opened: Opened,
    config: RuntimeConfig,
    failed: list[tuple[Candidate, str]],
    budget_mib: int,
) -> tuple[Candidate, tuple[Candidate, str] | None]:
    """The candidate for the smallest bucket: the one for the largest unless another is
    preferred there, passes its check and fits in the memory budget beside it (else the one
    refused for memory, and why)."""
    for candidate in _ranked(_at(speeds, config.buckets[0])):
        if candidate == largest:
            break
        if candidate in dict(failed):
            continue
        over = _over_budget(candidate, config, budget_mib)
        if over is not None:
            return largest, (candidate, over)
        if _first_checked([candidate], opened, config, failed) == candidate:
            return candidate, None
    return largest, None


def _serves(
    speeds: Speeds, buckets: tuple[int, ...], largest: Candidate, lone: Candidate
) -> dict[int, Candidate]:
    """Each bucket's candidate: of the two, the one preferred at its size."""
    serves = {}
    for bucket in buckets:
        ranking = _ranked(_at(speeds, bucket))
        serves[bucket] = min((lone, largest), key=ranking.index)
    return serves


def _refused(
    speeds: Speeds, buckets: tuple[int, ...], largest: Candidate, candidate: Candidate, why: str
) -> str:
    would = _serves(speeds, buckets, largest, candidate)
    sizes = size_ranges(bucket for bucket, c in would.items() if c == candidate)
    return f"fastest for batches of {sizes}, not opened beside {largest}, which serves them: {why}"


def _over_budget(candidate: Candidate, config: RuntimeConfig, budget_mib: int) -> str | None:
    """Why ``candidate``'s weights would not fit beside what this process holds now, or None."""
    path = model_file(config.model_path, _file_precision(candidate), CPU)
    size = path.stat().st_size if path.is_file() else 0
    try:
        copies = RUNTIMES[candidate.backend].copies(config)
        check_budget(budget_mib, size, copies, f"{path} on {candidate}")
    except ModelError as exc:
        return str(exc)
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
    ONNX Runtime sessions for ``adaptive`` on the CPU), plus the one being timed beside it, or
    serving some batch sizes beside it (``SplitModel``)."""
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


def timed_sizes(buckets: tuple[int, ...]) -> list[int]:
    """The batch sizes ``auto`` times: the smallest bucket and the largest up to TIMED_BATCH."""
    return sorted({buckets[0], min(TIMED_BATCH, buckets[-1])})


def _at(speeds: Speeds, size: int) -> dict[Candidate, float]:
    """Each candidate's images per second at a batch of ``size`` (``_speed``)."""
    return {candidate: _speed(timed, size) for candidate, timed in speeds.items()}


def _speed(timed: dict[int, float], size: int) -> float:
    """Images per second at ``size`` from those at the sizes timed: a batch's seconds taken as
    affine between two timed sizes (a cost per run plus a cost per image), and as many per image
    as at the nearest timed size outside them."""
    sizes = sorted(timed)
    if size <= sizes[0]:
        return timed[sizes[0]]
    if size >= sizes[-1]:
        return timed[sizes[-1]]
    high = next(s for s in sizes if s >= size)
    low = sizes[sizes.index(high) - 1]
    low_s, high_s = low / timed[low], high / timed[high]
    return size / (low_s + (high_s - low_s) * (size - low) / (high - low))


def _time(model: Backend, sizes: list[int]) -> dict[int, float]:
    """Images per second of one warm batch of each size, after its rows pass ``check_rows``."""
    model.check_rows(min(2, sizes[-1]))
    crop = model.metadata.recipe.crop_size
    speeds = {}
    for size in sizes:
        images = np.zeros((size, crop, crop, 3), dtype=np.uint8)
        model.run(images)  # the first run of a shape plans it
        seconds = []
        for _ in range(TIMED_RUNS):
            started = time.perf_counter()
            model.run(images)
            seconds.append(time.perf_counter() - started)
        speeds[size] = size / statistics.median(seconds)
    return speeds


def _file_precision(candidate: Candidate) -> str:
    return "fp32" if candidate.precision == "bf16" else candidate.precision


def _threads(config: RuntimeConfig) -> dict[str, Any]:
    """What the timings depend on of the lanes and threads."""
    return {
        "lanes": config.lanes,
        "intra_op_threads": config.intra_op_threads,
        "alone_threads": config.alone_threads,
        "ort_spinning": config.onnxruntime.spinning,
        "graph_optimization": config.onnxruntime.graph_optimization,
    }


def _entry(
    candidate: Candidate,
    *,
    images_per_s: dict[int, float] | None = None,
    skipped: str | None = None,
    batch_sizes: list[int] | None = None,
    cached: bool = False,
    chosen: bool = False,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"backend": candidate.backend, "precision": candidate.precision}
    if images_per_s is not None:
        entry["images_per_s"] = round(images_per_s[max(images_per_s)], 2)
        entry["images_per_s_by_batch"] = {n: round(v, 2) for n, v in images_per_s.items()}
        entry["cached"] = cached
    if skipped is not None:
        entry["skipped"] = skipped
    if batch_sizes:
        entry["batch_sizes"] = batch_sizes
    entry["chosen"] = chosen or bool(batch_sizes)
    return entry
