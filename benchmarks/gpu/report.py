"""benchmarks.gpu's results as Markdown (tables and the ratios the issue's targets name) and a
two-panel PNG (in-process images/s per bucket; HTTP images/s per concurrency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers.report import status_mix


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# GPU benchmark: {results['device']}",
        "",
        f"onnxruntime {results['onnxruntime']}, {results['cpus']} CPUs, model `{results['model']}`"
        f"{' (--quick smoke test)' if results['quick'] else ''}; "
        f"{results['seconds']:.0f} s in all. Command: `python -m benchmarks.gpu` (see its --help).",
        "",
        "## In process (no HTTP, no decoding): images/s and p50 ms per bucket",
        "",
    ]
    measured = [row for row in results["inprocess"] if "buckets" in row]
    buckets = sorted({b["batch_size"] for row in measured for b in row["buckets"]})
    lines += [
        "| variant | provider | start-up s | " + " | ".join(f"b={b}" for b in buckets) + " |",
        "|---" * (3 + len(buckets)) + "|",
    ]
    for row in results["inprocess"]:
        if "skipped" in row:
            lines.append(f"| {row['variant']} | skipped: {row['skipped']} |")
            continue
        cells = {
            b["batch_size"]: f"{b['images_per_s']:.0f} / {b['p50_ms']:.2f}" for b in row["buckets"]
        }
        lines.append(
            f"| {row['variant']} | {row['provider'].removesuffix('ExecutionProvider')} "
            f"| {row['startup_s']:.1f} | " + " | ".join(cells.get(b, "") for b in buckets) + " |"
        )
    lines += ["", *_ratios(measured), "", "## HTTP, 500x375 JPEGs", ""]
    decode = results["decode"]
    lines.append(
        f"Decode capacity: {decode['per_core_img_s']:.0f} img/s on one core, "
        f"{decode['all_cores_img_s']:.0f} if every core decoded (an upper bound)."
    )
    lines += ["", "| workers | clients | img/s | p50 ms | p99 ms | statuses | server CPU % |"]
    lines.append("|---|---|---|---|---|---|---|")
    for run in results["http"]:
        if "error" in run:
            lines.append(f"| {run['workers']} | failed: {run['error'].splitlines()[-1]} |")
            continue
        for p in run["points"]:
            lines.append(
                f"| {run['workers']} | {p['concurrency']} | {p['images_per_s']:.0f} "
                f"| {_ms(p['p50_ms'])} | {_ms(p['p99_ms'])} | {status_mix(p['statuses'])} "
                f"| {p['server_cpu_percent']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def _ratios(measured: list[dict[str, Any]]) -> list[str]:
    """CUDA graphs' speed-up at batch 1 (the target is >= 1.3x), and the best ceiling."""
    by_name = {row["variant"]: row for row in measured}
    out = []
    for precision in ("fp32", "fp16"):
        plain, graphs = by_name.get(f"cuda-{precision}"), by_name.get(f"cuda-{precision}-graphs")
        if plain and graphs:
            ratio = plain["buckets"][0]["p50_ms"] / graphs["buckets"][0]["p50_ms"]
            out.append(f"- CUDA graphs at batch 1, {precision}: {ratio:.2f}x faster (p50)")
    if measured:
        best = max(
            ((row["variant"], b) for row in measured for b in row["buckets"]),
            key=lambda pair: pair[1]["images_per_s"],
        )
        out.append(
            f"- Best ceiling: {best[1]['images_per_s']:.0f} img/s ({best[0]}, "
            f"batch {best[1]['batch_size']})"
        )
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (inner, outer) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in results["inprocess"]:
        if "buckets" in row:
            sizes = [b["batch_size"] for b in row["buckets"]]
            inner.plot(
                sizes, [b["images_per_s"] for b in row["buckets"]], marker="o", label=row["variant"]
            )
    for run in results["http"]:
        if "points" in run:
            clients = [p["concurrency"] for p in run["points"]]
            outer.plot(
                clients,
                [p["images_per_s"] for p in run["points"]],
                marker="o",
                label=f"{run['workers']} worker(s)",
            )
    for axis, xlabel, title in (
        (inner, "batch bucket", "in process (no HTTP, no decode)"),
        (outer, "concurrent clients", "HTTP, 500x375 JPEGs"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("images/s")
        axis.set_title(f"{title}: {results['device']}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
