"""benchmarks.backends' report: every row, skipped ones with why, and the service's share of the
best fp32-grade in-process figure (int8 is another grade, never the yardstick)."""

from __future__ import annotations

from benchmarks.backends import markdown


def test_the_report_names_every_candidate_and_the_share_of_the_best_fp32_grade() -> None:
    result = {
        "date": "2026-12-03",
        "command": "python -m benchmarks.backends",
        "cpu": "2 cores",
        "model": "resnet50-random-fp32.onnx",
        "in_process": [
            {
                "backend": "onnxruntime",
                "precision": "fp32",
                "mode": "lanes",
                "batch_1": 8.0,
                "batch_8": 9.0,
                "peak_rss_mib": 500,
                "max_diff_vs_ort_fp32": 0.0,
            },
            {
                "backend": "openvino",
                "precision": "bf16",
                "mode": "lanes",
                "skipped": "this CPU has no bf16",
            },
            {
                "backend": "openvino",
                "precision": "int8",
                "mode": "hint",
                "batch_1": 30.0,
                "batch_8": 40.0,
                "peak_rss_mib": 300,
                "max_diff_vs_ort_fp32": 0.01,
            },
        ],
        "service": [
            {
                "backend_setting": "auto",
                "served_by": "onnxruntime fp32",
                "clients": 8,
                "images_per_s": 8.1,
                "p50_ms": 900.0,
                "p99_ms": 1200.0,
                "server_peak_rss_mib": 700,
            },
            {
                "backend_setting": "auto, int8",
                "served_by": "openvino int8",
                "clients": 8,
                "images_per_s": 36.0,
                "p50_ms": 200.0,
                "p99_ms": 300.0,
                "server_peak_rss_mib": 400,
            },
        ],
    }
    text = markdown(result)
    assert "| openvino | bf16 | server lanes | skipped: this CPU has no bf16 |" in text
    assert (
        "| openvino | int8 | throughput hint, 4 in flight | 30.0 | 40.0 | 300 | 1.0e-02 |" in text
    )
    assert "(fp32-grade 9.0 img/s, int8 40.0 img/s)" in text
    assert "| auto | onnxruntime fp32 | 8 | 8.1 | 90% |" in text
    assert "| auto, int8 | openvino int8 | 8 | 36.0 | 90% |" in text  # against int8's 40
    assert "## In process (resnet50-random-fp32.onnx; img/s)" in text
    alone = markdown(result | {"service": []})  # --no-service
    assert alone.endswith("The service: not measured (--no-service).\n")
    assert "| backend setting |" not in alone
    assert "| openvino | int8 | throughput hint" in alone
