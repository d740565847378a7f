"""A rollout: a candidate version of a model served beside the version serving (the baseline),
its answers compared with the baseline's, and a verdict (docs/rollouts.md).

This module is the rollout's plan, its figures and its judge, with no event loop in it: a worker
routes requests and compares answers (app.repository.route) and adds what it saw to a ``Tally``;
the ``Judge`` holds the sum of every worker's tallies, says when the candidate must be rolled
back, and gives the state ``GET .../rollout`` answers. With one worker the judge lives in it;
with several, in their supervisor, so the figures and the verdict are the whole server's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Each version's latencies kept for its p50 and p99: the most recent ones, per worker and judge.
LATENCIES_KEPT = 4096


class Mode(StrEnum):
    CANARY = "canary"  # a share of the requests answered by the candidate
    SHADOW = "shadow"  # every request answered by the baseline; a copy runs on the candidate


class Status(StrEnum):
    RUNNING = "running"
    ROLLED_BACK = "rolled_back"
    PROMOTED = "promoted"
    STOPPED = "stopped"


class Role(StrEnum):
    BASELINE = "baseline"
    CANDIDATE = "candidate"


@dataclass(frozen=True)
class Plan:
    """What a rollout was asked to do, as every worker applies it."""

    ident: str  # this rollout's own, so figures from an earlier one are never counted in it
    model: str
    baseline: str  # the version serving when it started
    candidate: str
    mode: Mode
    percent: float  # canary: the share of requests, 0..100; shadow: 100 (every request copied)
    sticky: bool  # canary: one caller (key, or client address) always sees one version
    min_agreement: float
    max_error_rate: float
    min_requests: int
    compare_share: float  # at most this share of the compute goes to comparisons

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "mode": self.mode.value,
            "percent": self.percent,
            "sticky": self.sticky,
            "min_agreement": self.min_agreement,
            "max_error_rate": self.max_error_rate,
            "min_requests": self.min_requests,
            "compare_share": self.compare_share,
        }


@dataclass
class Tally:
    """What a worker saw since it last reported; tallies add up (``add``).

    ``requests`` and ``errors`` by role: requests a version answered (a canary's), or copies it
    ran (a shadow's candidate). Errors are the server's own failures (5xx), not a bad image's.
    ``compared``: requests whose images both versions computed; ``agreeing``: their images whose
    top class is the same; ``difference``: over those images, the sum of the largest change of
    any class's probability. ``dropped``: copies not run, to keep comparisons within their share.
    """

    requests: dict[Role, int] = field(default_factory=lambda: dict.fromkeys(Role, 0))
    errors: dict[Role, int] = field(default_factory=lambda: dict.fromkeys(Role, 0))
    latencies: dict[Role, deque[float]] = field(
        default_factory=lambda: {role: deque(maxlen=LATENCIES_KEPT) for role in Role}
    )
    compared: int = 0
    compared_images: int = 0
    agreeing: int = 0
    difference: float = 0.0
    dropped: int = 0

    def answered(self, role: Role, seconds: float, failed: bool) -> None:
        self.requests[role] += 1
        self.errors[role] += failed
        if not failed:
            self.latencies[role].append(seconds * 1000)

    def compare(self, images: int, agreeing: int, difference: float) -> None:
        self.compared += 1
        self.compared_images += images
        self.agreeing += agreeing
        self.difference += difference

    def add(self, other: Tally) -> None:
        for role in Role:
            self.requests[role] += other.requests[role]
            self.errors[role] += other.errors[role]
            self.latencies[role].extend(other.latencies[role])
        self.compared += other.compared
        self.compared_images += other.compared_images
        self.agreeing += other.agreeing
        self.difference += other.difference
        self.dropped += other.dropped

    def __bool__(self) -> bool:
        return bool(sum(self.requests.values()) or self.compared or self.dropped)

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.compared_images if self.compared_images else None

    def error_rate(self, role: Role) -> float | None:
        return self.errors[role] / self.requests[role] if self.requests[role] else None


class Judge:
    """A rollout's figures, the sum of every worker's, and its status."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tally = Tally()
        self.status = Status.RUNNING
        self.reason = ""
        self.started = time.time()
        self.ended: float | None = None

    def add(self, tally: Tally) -> str | None:
        """Counts ``tally``; while running, why the candidate must be rolled back, if it must."""
        self.tally.add(tally)
        return self.verdict() if self.status is Status.RUNNING else None

    def verdict(self) -> str | None:
        """Why the candidate must go, once ``min_requests`` were compared (agreement) or answered
        by it (errors: a candidate failing everything is never compared); else None."""
        plan, tally = self.plan, self.tally
        agreement = tally.agreement
        judged = tally.compared >= plan.min_requests and agreement is not None
        if judged and agreement is not None and agreement < plan.min_agreement:
            return (
                f"top-1 agreement {agreement:.3f} < min_agreement {plan.min_agreement:g} "
                f"over {tally.compared} compared requests ({tally.compared_images} images)"
            )
        attempts = tally.requests[Role.CANDIDATE]
        rate = tally.error_rate(Role.CANDIDATE)
        if attempts >= plan.min_requests and rate is not None and rate > plan.max_error_rate:
            return (
                f"candidate error rate {rate:.3f} > max_error_rate {plan.max_error_rate:g} "
                f"({tally.errors[Role.CANDIDATE]} of {attempts} requests)"
            )
        return None

    def end(self, status: Status, reason: str = "") -> None:
        if self.status is Status.RUNNING:
            self.status, self.reason, self.ended = status, reason, time.time()

    def state(self) -> dict[str, Any]:
        """The answer to ``GET .../rollout``."""
        tally, plan = self.tally, self.plan
        versions = {
            role.value: {
                "version": plan.baseline if role is Role.BASELINE else plan.candidate,
                "requests": tally.requests[role],
                "errors": tally.errors[role],
                "p50_ms": _percentile(tally.latencies[role], 50),
                "p99_ms": _percentile(tally.latencies[role], 99),
            }
            for role in Role
        }
        difference = tally.difference / tally.compared_images if tally.compared_images else None
        return plan.describe() | {
            "status": self.status.value,
            "reason": self.reason or None,
            "started": _iso(self.started),
            "ended": _iso(self.ended) if self.ended is not None else None,
            "versions": versions,
            "compared": tally.compared,
            "compared_images": tally.compared_images,
            "agreement": _rounded(tally.agreement),
            "mean_probability_difference": _rounded(difference),
            "dropped": tally.dropped,
        }


def _percentile(values: deque[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)  # nearest rank
    return round(ordered[rank], 2)


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
