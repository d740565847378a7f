"""INT8 against FP32: in-process ceiling of artifact pairs, measured in one run.

    PYTHONPATH=. python -m benchmarks.precision FP32.onnx INT8.onnx [FP32.onnx INT8.onnx ...]

Writes benchmarks/results/precision.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.settings import Settings
from benchmarks.ceiling import ceiling

RESULTS = Path(__file__).resolve().parent / "results"


def best(path: str) -> tuple[float, int]:
    rows = ceiling(Settings(model_path=Path(path)), seconds=3.0)
    top = max(rows, key=lambda row: row["images_per_s"])
    return top["images_per_s"], top["batch_size"]


def main(paths: list[str]) -> None:
    if not paths or len(paths) % 2:
        sys.exit(__doc__)
    lines = [
        "| fp32 artifact | int8 artifact | fp32 img/s (batch) | int8 img/s (batch) | int8 / fp32 |"
    ]
    lines.append("|---|---|---|---|---|")
    for fp32, int8 in zip(paths[::2], paths[1::2], strict=True):
        (f, fb), (i, ib) = best(fp32), best(int8)
        lines.append(f"| {fp32} | {int8} | {f:.1f} ({fb}) | {i:.1f} ({ib}) | {i / f:.2f}x |")
        print(lines[-1], flush=True)
    (RESULTS / "precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
