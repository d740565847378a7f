"""benchmarks.slo's table and figure, from its results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers.report import status_mix


def _figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    schedule = results["schedule"]
    lines = [
        f"# Capacity under a latency bound, open loop ({results['date']})",
        "",
        f"CPU: {machine['cpu']}, {machine['cpus']} logical CPUs ({machine['flags']}), "
        f"{machine['platform']}. Each probe: {schedule['warmup_s']:g} s warm-up then "
        f"{schedule['seconds']:g} s of Poisson arrivals"
        + (
            f" (stretched to hold {schedule['min_requests']} arrivals, up to "
            f"{schedule['max_seconds']:g} s)"
            if schedule.get("min_requests")
            else ""
        )
        + ", one 500x375 JPEG per request; "
        f"capacity = the highest offered rate at which >= {100 * schedule['quantile']:g}% of "
        "requests got a 200 within the bound (bisection, 5%). Closed loop: "
        f"{results['closed_loop_s']:g} s per point. Servers alone, in turn, in one run.",
        "",
    ]
    header = (
        "| server | served by | capacity req/s | x script | x LitServe | x own closed c=16 "
        "| closed c=16 req/s | c=1 mean ms | c=1 p99 ms | probes |"
    )
    for model in dict.fromkeys(run["model"] for run in results["runs"]):
        runs = [r for r in results["runs"] if r["model"] == model]
        lines += [
            f"## {model}, p99 bound {runs[0]['bound_ms']:g} ms",
            "",
            header,
            "|---" * 10 + "|",
        ]
        peers = {r["server"]: r.get("capacity_per_s") for r in runs}
        for run in runs:
            if "error" in run:
                lines.append(f"| {run['server']} | failed: {run['error'].splitlines()[0]} |")
                continue
            capacity = run["capacity_per_s"]
            lines.append(
                f"| {run['server']} | {run.get('served_by', '-')} | {capacity:.1f} "
                f"| {_ratio(capacity, peers.get('handwritten'))} "
                f"| {_ratio(capacity, peers.get('litserve'))} "
                f"| {_figure(run['capacity_vs_closed'], 2)} "
                f"| {run['c16']['images_per_s']:.1f} | {run['c1']['mean_ms']:.1f} "
                f"| {_figure(run['c1']['p99_ms'])} | {len(run['probes'])} |"
            )
        lines += ["", "Probes (offered -> 200s within the bound):", ""]
        lines += [
            "| server | offered req/s | good % | 200/s | p50 ms | p99 ms | statuses "
            "| server CPU % | client CPU % | connections | passed |",
            "|---" * 11 + "|",
        ]
        for run in runs:
            for p in sorted(run.get("probes", []), key=lambda p: p["offered_per_s"]):
                lines.append(
                    f"| {run['server']} | {p['offered_per_s']:.1f} "
                    f"| {100 * p['good_share']:.2f} | {p['answered_per_s']:.1f} "
                    f"| {_figure(p['p50_ms'])} | {_figure(p['p99_ms'])} "
                    f"| {status_mix(p['statuses'])} | {_figure(p['server_cpu_percent'], 0)} "
                    f"| {p['client_cpu_percent']:.0f} | {p['connections']} "
                    f"| {'yes' if p['passed'] else 'no'} |"
                )
        overloads = [r for r in runs if "overload" in r]
        for run in overloads:
            p = run["overload"]
            lines += [
                "",
                f"{run['server']} at 2x its capacity ({p['offered_per_s']:.1f} req/s offered): "
                f"200s {p['answered_per_s']:.1f}/s ("
                f"{_ratio(p['answered_per_s'], run['capacity_per_s'])} of capacity), their p99 "
                f"{_figure(p['p99_ms'])} ms, statuses {status_mix(p['statuses'])}.",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None, other: float | None) -> str:
    return "-" if not value or not other else f"{value / other:.2f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(run["model"] for run in results["runs"]))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        for run in (r for r in results["runs"] if r["model"] == model and "error" not in r):
            probes = sorted(run["probes"], key=lambda p: p["offered_per_s"])
            offered = [p["offered_per_s"] for p in probes]
            p99 = [p["p99_ms"] if p["p99_ms"] is not None else np.nan for p in probes]
            (line,) = axis.plot(offered, p99, marker="o", label=f"{run['server']} p99")
            axis.axvline(run["capacity_per_s"], color=line.get_color(), alpha=0.3, ls=":")
        bound = next(r["bound_ms"] for r in results["runs"] if r["model"] == model)
        axis.axhline(bound, color="black", alpha=0.5, lw=1, label=f"bound {bound:g} ms")
        axis.set_xlabel("offered load (req/s, Poisson)")
        axis.set_ylabel("p99 latency of 200s (ms)")
        axis.set_yscale("log")
        axis.set_title(f"{model} (dotted: capacity at the bound)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
