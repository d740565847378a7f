"""The tuning cache: ``auto``'s timings kept per model file, CPU, runtime versions and threads, and
reused, so that loads of one file on one kind of CPU choose alike (tests/unit/test_app_backends.py:
the choice made from them)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from app.runtimes import tuning
from app.runtimes.base import Backend
from app.runtimes.registry import open_model, tuning_entry
from tests.helpers.backends import config_for, tiny_model
from tests.helpers.models import build_model

TIMED = "backend candidate timed"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tuning"))


def timed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage() == TIMED]


def opened(path: Path, directory: Path, **settings: object) -> Backend:
    model = open_model(config_for(path, tuning_cache_dir=directory, **settings))
    model.close()
    return model


def choice(model: Backend) -> list[dict[str, object]]:
    """``model.choice`` without whether it came from the cache."""
    return [{k: v for k, v in e.items() if k != "cached"} for e in model.choice]


def test_a_second_load_reuses_the_timings_and_chooses_alike(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first = opened(tiny, tmp_path)
    assert timed(caplog)
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".json", ".lock"]
    caplog.clear()
    second = opened(tiny, tmp_path)
    assert not timed(caplog)  # nothing timed: the start-up is shorter
    assert all(e["cached"] for e in second.choice if "images_per_s" in e)
    assert choice(second) == choice(first)
    assert second.describe() == first.describe()


def test_workers_starting_at_once_time_once(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each waits on the entry's lock: the first to take it times, the other reuses what it kept.
    caplog.set_level(logging.INFO)
    models: list[Backend] = []
    workers = [
        threading.Thread(target=lambda: models.append(opened(tiny, tmp_path))) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    # Each candidate timed once, by one of them.
    assert len(timed(caplog)) == len([e for e in models[0].choice if "images_per_s" in e])
    assert sorted(m.choice[0]["cached"] for m in models) == [False, True]
    assert choice(models[0]) == choice(models[1])


@pytest.mark.parametrize(
    "change",
    [
        {"concurrent_batches": 1},
        {"intra_op_threads": 2},
        {"ort_spinning": "off"},
        {"graph_optimization": "basic"},
        {"max_batch_size": 4},
        {"model_precision": "int8"},
    ],
    ids=["lanes", "threads", "spinning", "graph-optimization", "batch-sizes", "candidates"],
)
def test_another_configuration_is_another_entry(
    tiny: Path, tmp_path: Path, change: dict[str, object]
) -> None:
    path, key = tuning_entry(config_for(tiny, tuning_cache_dir=tmp_path))
    other_path, other_key = tuning_entry(config_for(tiny, tuning_cache_dir=tmp_path, **change))
    assert other_key != key
    assert other_path != path


def test_another_file_cpu_or_runtime_version_is_another_entry(tiny: Path, tmp_path: Path) -> None:
    config = config_for(tiny, tuning_cache_dir=tmp_path)
    path, key = tuning_entry(config)
    assert key["cpu"] == tuning.cpu()
    assert key["cpu"]["model"]
    assert set(key["runtimes"]) == {"onnxruntime", "openvino"}
    # The file's content is the key, not its path, size or time: a replica's copy shares the
    # entry, another model of the same name does not.
    copy = tmp_path / "copy" / tiny.name
    copy.parent.mkdir()
    copy.write_bytes(tiny.read_bytes())
    assert tuning_entry(replace(config, model_path=copy))[0] == path
    (tmp_path / "other").mkdir()
    other = build_model(tmp_path / "other" / tiny.name, conv_layers=2, width=8)
    assert tuning_entry(replace(config, model_path=other))[0] != path
    for part, value in (("cpu", {"model": "elsewhere", "flags": []}), ("runtimes", {})):
        assert tuning.entry_path(tmp_path, key | {part: value}) != path


def test_a_stored_entry_reads_back_as_written(tmp_path: Path) -> None:
    path, key = tmp_path / "entry.json", {"format": tuning.FORMAT}
    timings: tuning.Timings = {"onnxruntime fp32": {1: 10.5, 8: 80.0}, "openvino fp32": "failed"}
    tuning.store(path, key, timings)
    assert tuning.load(path, key) == timings
    assert tuning.load(path, {"format": 0}) is None  # another key: a miss
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]  # no partial file left


def test_retime_times_again_once_per_start(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    opened(tiny, tmp_path)
    path, _ = tuning_entry(config_for(tiny, tuning_cache_dir=tmp_path))
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(stored | {"timed_at": tuning.STARTED - 60}))  # a previous start's
    caplog.clear()
    assert opened(tiny, tmp_path).choice[0]["cached"]  # cache: reused, however old
    assert not timed(caplog)
    opened(tiny, tmp_path, tuning="retime")
    assert timed(caplog)  # retime: timed again, and kept
    assert json.loads(path.read_text())["timed_at"] >= tuning.STARTED
    caplog.clear()
    assert opened(tiny, tmp_path, tuning="retime").choice[0]["cached"]  # once per start
    assert not timed(caplog)


def test_off_neither_reads_nor_writes(tiny: Path, tmp_path: Path) -> None:
    directory = tmp_path / "tuning"
    model = opened(tiny, directory, tuning="off")
    assert not directory.exists()
    assert not model.choice[0]["cached"]


def test_an_unusable_directory_is_logged_and_the_model_served(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    model = opened(tiny, tmp_path / "file" / "tuning")  # not a directory, even for root
    assert any(e["chosen"] for e in model.choice)
    (warning,) = [r for r in caplog.records if r.getMessage() == "tuning cache not writable"]
    assert warning.levelno == logging.WARNING


def test_an_unreadable_entry_is_timed_again_and_replaced(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, key = tuning_entry(config_for(tiny, tuning_cache_dir=tmp_path))
    path.write_text('{"key": ')  # cut short
    assert not opened(tiny, tmp_path).choice[0]["cached"]
    assert [r.levelno for r in caplog.records if "unreadable" in r.getMessage()] == [
        logging.WARNING
    ]
    assert tuning.load(path, key) is not None
