"""Pure parts of the peer benchmark: accounting of one load point, the table, the figure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

OK = "200"


class Outcome(NamedTuple):
    """One request: when it was sent and answered (seconds, one clock), and how it ended."""

    started: float
    finished: float
    status: str  # the HTTP status, or the client exception's class name


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: Iterable[Outcome], window: tuple[float, float]) -> dict[str, Any]:
    """Throughput, latency and status mix of the requests that finished inside the window.

    Requests that finished during warm-up or after the window (the drain) do not count, so
    every server is measured over the same steady-state seconds.
    """
    start, end = window
    inside = [o for o in outcomes if start <= o.finished < end]
    ms = sorted(1000 * (o.finished - o.started) for o in inside if o.status == OK)
    statuses = Counter(o.status for o in inside)
    return {
        "images_per_s": len(ms) / (end - start),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "statuses": dict(statuses.most_common()),
    }


def cpu_seconds(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU used by a process tree between two snapshots (pid -> user+system seconds).

    A process born in between counts in full; one that exited in between is lost, which only
    happens to short-lived helpers.
    """
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def status_mix(statuses: Mapping[str, int]) -> str:
    """'200 97%, 503 3%': shares of the finished requests, largest first."""
    total = sum(statuses.values())
    if not total:
        return "none finished"
    ranked = sorted(statuses.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{status} {100 * count / total:.0f}%" for status, count in ranked)


def agreement(top5: list[list[int]], reference: list[list[int]] | None) -> str:
    """How many check images get ours' top-1 class, and ours' whole top-5 in order."""
    if reference is None:
        return "no reference (ours not run)"
    pairs = list(zip(top5, reference, strict=True))
    first = sum(a[0] == b[0] for a, b in pairs)
    return f"top-1 {first}/{len(pairs)}, top-5 {sum(a == b for a, b in pairs)}/{len(pairs)}"


def _whole(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(results: dict[str, Any]) -> str:
    header = (
        "| server | start-up s | conc | images/s | p50 ms | p95 ms | p99 ms | statuses "
        "| server CPU % | CPU ms/req | peak RSS MiB | peak PSS MiB |"
    )
    lines = []
    for model in dict.fromkeys(run["model"] for run in results["runs"]):
        lines += [f"## {model}", "", header, "|---" * 12 + "|"]
        for run in (r for r in results["runs"] if r["model"] == model):
            if "error" in run:
                lines.append(f"| {run['server']} | failed: {run['error'].splitlines()[0]} |")
            for p in run.get("points", []):
                lines.append(
                    f"| {run['server']} | {run['startup_s']:.1f} | {_concurrency(p)} "
                    f"| {p['images_per_s']:.1f} | {_whole(p['p50_ms'])} | {_whole(p['p95_ms'])} "
                    f"| {_whole(p['p99_ms'])} | {status_mix(p['statuses'])} "
                    f"| {p['server_cpu_percent']:.0f} "
                    f"| {p['server_cpu_ms_per_request']:.1f} "
                    f"| {_whole(p['peak_rss_mib'])} "
                    f"| {_whole(p['peak_pss_mib'])} |"
                )
        lines += ["", _agreement(results, model), ""]
        served = [
            r["served_by"] for r in results["runs"] if r["model"] == model and "served_by" in r
        ]
        if served:
            lines += [
                f"Ours served on (each start, as its /v1/models says): {', '.join(served[0])}",
                "",
            ]
    points = [p for run in results["runs"] for p in run.get("points", [])]
    if not all(p["steady"] for p in points):
        lines += [UNSTEADY, ""]
    return "\n".join(lines)


UNSTEADY = (
    "\\* measured before every client had had an answer: the server was not steady within "
    "the warm-up limit, so its latency there is understated."
)


def _concurrency(point: dict[str, Any]) -> str:
    mark = "" if point["steady"] else "\\*"
    return f"{point['concurrency']}{mark}"


def _agreement(results: dict[str, Any], model: str) -> str:
    runs = [r for r in results["runs"] if r["model"] == model]
    parts = [
        f"{r['server']} {r['agreement']}"
        for r in runs
        if r["server"] != "ours" and "error" not in r
    ]
    return "Answers equal to ours on the check images: " + ("; ".join(parts) or "no peers")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(run["model"] for run in results["runs"]))
    figure, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for run in (r for r in results["runs"] if r["model"] == model and "error" not in r):
            concurrency = [p["concurrency"] for p in run["points"]]
            p99 = [p["p99_ms"] if p["p99_ms"] is not None else np.nan for p in run["points"]]
            row[0].plot(concurrency, [p["images_per_s"] for p in run["points"]], marker="o")
            row[1].plot(concurrency, p99, marker="o", label=run["server"])
        for axis, ylabel in zip(row, ("images/s (200 only)", "p99 of 200s (ms)"), strict=True):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(ylabel)
            axis.set_title(model)
            axis.grid(alpha=0.3)
        row[1].set_yscale("log")
        row[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
