from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.process.cpus import cpu_share, usable_cpus
from app.repository.configs import (
    alone_threads,
    batch_buckets,
    concurrent_batches,
    intra_op_threads,
)
from app.runtimes.providers import CPU, CUDA
from app.settings import Settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.model_path == Path("artifacts/model.onnx")
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.limits.formats == ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF")


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_WAIT_MS", "3.5")
    monkeypatch.setenv("RESNET_SERVE_ALLOWED_FORMATS", '["PNG", "JPEG"]')
    monkeypatch.setenv("RESNET_SERVE_PROVIDERS", "cpu")
    settings = Settings()
    assert settings.max_wait_ms == 3.5
    assert settings.limits.formats == ("PNG", "JPEG")
    assert settings.providers == "cpu"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("RESNET_SERVE_MAX_WAIT", "3", "RESNET_SERVE_MAX_WAIT"),
        ("RESNET_SERVE_PROVIDERS", "tpu", "providers"),
        ("RESNET_SERVE_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("RESNET_SERVE_ALLOWED_FORMATS", '["PSD"]', "PSD"),
        ("RESNET_SERVE_MAX_QUEUE_IMAGES", "4", "max_images_per_request=16"),
        ("RESNET_SERVE_BATCH_BUCKETS", "[1, 4, 2, 8]", "ascending"),
        ("RESNET_SERVE_BATCH_BUCKETS", "[1, 2, 4]", "must end at max_batch_size=8"),
        ("RESNET_SERVE_MAX_REQUEST_PIXELS", "1000", "max_image_pixels=40000000"),
        ("RESNET_SERVE_WORKERS", "0", "workers"),
        ("RESNET_SERVE_WORKERS", "65", "workers"),
    ],
    ids=[
        "misspelt-name",
        "unknown-provider",
        "zero-batch",
        "unknown-format",
        "queue-too-small",
        "buckets-unsorted",
        "buckets-short",
        "request-pixels-below-image",
        "no-workers",
        "too-many-workers",
    ],
)
def test_bad_configuration_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=fragment):
        Settings()


@pytest.mark.parametrize(
    ("provider", "given", "expected"),
    [
        ("CPUExecutionProvider", None, (1, 2, 3, 4, 5, 6)),
        ("CUDAExecutionProvider", None, (1, 2, 4, 6)),
        ("CUDAExecutionProvider", "[2, 6]", (2, 6)),
    ],
    ids=["cpu-every-size", "cuda-powers-of-two", "given"],
)
def test_batch_buckets(
    monkeypatch: pytest.MonkeyPatch, provider: str, given: str | None, expected: tuple[int, ...]
) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "6")
    if given is not None:
        monkeypatch.setenv("RESNET_SERVE_BATCH_BUCKETS", given)
    assert batch_buckets(Settings(), provider) == expected


@pytest.mark.parametrize(
    ("cores", "workers", "lanes_set", "intra_op", "share", "lanes", "threads", "alone", "decode"),
    [
        (8, 1, 0, 0, 8, 8, 1, 8, 4),
        (8, 2, 0, 0, 4, 4, 1, 4, 4),
        (8, 3, 0, 0, 2, 2, 1, 2, 2),
        (2, 2, 0, 0, 1, 1, 1, 1, 1),
        (2, 4, 0, 0, 1, 1, 1, 1, 1),
        (64, 1, 0, 0, 64, 16, 4, 64, 4),
        (8, 1, 2, 0, 8, 2, 4, 8, 4),
        (8, 4, 0, 3, 2, 2, 3, 6, 2),
    ],
    ids=[
        "one-worker-a-lane-a-core",
        "halves",
        "thirds-round-down",
        "one-each",
        "never-zero",
        "lanes-capped",
        "lanes-set",
        "threads-set",
    ],
)
def test_workers_share_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cores: int,
    workers: int,
    lanes_set: int,
    intra_op: int,
    share: int,
    lanes: int,
    threads: int,
    alone: int,
    decode: int,
) -> None:
    # The affinity, not the machine's core count: taskset and container cpusets count.
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(100, 100 + cores)))
    monkeypatch.setattr("app.process.cpus.CGROUP_CPU_MAX", tmp_path / "no-cgroup")
    settings = Settings(workers=workers, concurrent_batches=lanes_set, intra_op_threads=intra_op)
    assert cpu_share(workers) == share
    assert concurrent_batches(settings, CPU) == lanes
    assert concurrent_batches(settings, CUDA) == (lanes_set or 1)  # a GPU: one stream of batches
    assert intra_op_threads(settings) == threads
    assert alone_threads(settings) == alone  # a lone batch: every lane's threads
    assert settings.decode_threads == decode
    assert Settings(workers=workers, decode_threads=7).decode_threads == 7


@pytest.mark.parametrize(
    ("cpu_max", "usable"),
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", 8)],
    ids=["two-cpus", "rounded-up", "at-least-one", "no-quota"],
)
def test_a_cgroup_cpu_quota_caps_the_usable_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str, usable: int
) -> None:
    # Docker's --cpus and a Kubernetes CPU limit: the affinity still lists every core of the node.
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr("app.process.cpus.CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert usable_cpus() == usable
    assert concurrent_batches(Settings(), CPU) == usable
