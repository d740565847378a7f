from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.repository.configs import runtime_config
from app.runtimes.onnxruntime import BoundBuckets, OnnxModel
from app.runtimes.providers import CPU
from app.settings import Settings
from core.contract import CLASSIFY, OUTPUT_NAME, SERVED_OUTPUTS
from core.errors import ModelError
from tests.helpers.models import CROP_SIZE, LABELS, build_model


def test_loads_the_contract_and_predicts(make_settings: Callable[..., Settings]) -> None:
    model = OnnxModel.load(runtime_config(make_settings()))
    assert model.provider == CPU
    assert model.metadata.labels == tuple(LABELS)
    assert model.metadata.recipe.crop_size == CROP_SIZE
    assert model.metadata.accuracy == {"top1": 0.5, "dataset": "synthetic", "images": 10}
    images = np.random.default_rng(0).integers(0, 256, (3, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    probabilities = model.predict(images)
    assert probabilities.shape == (3, len(LABELS))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    model.warm_up([1, 2])


def test_accuracy_may_be_null(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = build_model(tmp_path / "m.onnx", metadata={"accuracy": "null"})
    assert OnnxModel.load(runtime_config(make_settings(model_path=path))).metadata.accuracy is None


M = [0.5, 0.5, 0.5]
BAD_METADATA = [
    pytest.param({}, ("labels",), "missing ['labels']", id="missing-labels"),
    pytest.param({}, ("accuracy", "source_sha256"), "missing", id="missing-two"),
    pytest.param({"num_classes": "9"}, (), "num_classes='9'", id="num-classes-vs-labels"),
    pytest.param(
        {"labels": json.dumps(LABELS[:9]), "num_classes": "9"}, (), "axis 1", id="labels-vs-output"
    ),
    pytest.param({"labels": "[1, 2]"}, (), "list of strings", id="labels-not-strings"),
    pytest.param({"labels": "not json"}, (), "not valid JSON", id="labels-not-json"),
    pytest.param({"precision": "fp8"}, (), "fp8", id="unknown-precision"),
    pytest.param(
        {"preprocessing": json.dumps({"resize_size": 40, "crop_size": 32, "mean": M, "std": M})},
        (),
        "axis 1",
        id="crop-vs-input",
    ),
    pytest.param({"preprocessing": "{}"}, (), "preprocessing", id="empty-preprocessing"),
    pytest.param(
        {"preprocessing": json.dumps({"resize_size": 40, "crop_size": 32})},
        (),
        "KeyError('mean')",
        id="no-normalisation",
    ),
    pytest.param({"accuracy": "[1]"}, (), "accuracy", id="accuracy-wrong-type"),
]


@pytest.mark.parametrize(("metadata", "drop", "fragment"), BAD_METADATA)
def test_bad_metadata_fails_start_up_with_a_clear_message(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    metadata: dict[str, str],
    drop: tuple[str, ...],
    fragment: str,
) -> None:
    path = build_model(tmp_path / "m.onnx", metadata=metadata, drop=drop)
    with pytest.raises(ModelError, match=re.escape(fragment)):
        OnnxModel.load(runtime_config(make_settings(model_path=path)))


def test_missing_file(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ModelError, match=r"model file not found: .*nope\.onnx"):
        OnnxModel.load(runtime_config(make_settings(model_path=tmp_path / "nope.onnx")))


def test_corrupt_file(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x07 definitely not a protobuf " * 10)
    with pytest.raises(ModelError, match="cannot load ONNX model") as raised:
        OnnxModel.load(runtime_config(make_settings(model_path=path)))
    assert "\n" not in str(raised.value)


def test_bound_buckets_match_a_plain_run_and_keep_earlier_results(
    make_settings: Callable[..., Settings],
) -> None:
    plain = OnnxModel.load(runtime_config(make_settings()))
    bound = OnnxModel.load(runtime_config(make_settings()))
    bound.bind([1, 2, 4])
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, 256, (n, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8) for n in (4, 1, 2)
    ]
    results = [bound.predict(batch) for batch in batches]
    again = bound.predict(batches[0][::-1].copy())  # reuses bucket 4's buffers
    for batch, result in zip(batches, results, strict=True):
        np.testing.assert_allclose(result, plain.predict(batch), atol=1e-6)
    np.testing.assert_allclose(again, plain.predict(batches[0][::-1].copy()), atol=1e-6)
    with pytest.raises(ValueError, match=r"batch of 3 is not one of the buckets \[1, 2, 4\]"):
        bound.predict(np.zeros((3, CROP_SIZE, CROP_SIZE, 3), np.uint8))


def test_each_inference_thread_binds_its_own_buffers_and_graph_ids(
    make_settings: Callable[..., Settings],
) -> None:
    plain = OnnxModel.load(runtime_config(make_settings()))
    rows = {OUTPUT_NAME: (len(LABELS),), "embedding": (48,)}
    bound = BoundBuckets(
        plain._session, [1, 2], CROP_SIZE, rows, device="cpu", graphs=True, class_ids=True
    )
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (2, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8) for _ in range(8)]
    ids: dict[str, list[str]] = {}
    outputs: dict[str, list[np.ndarray]] = {}

    def lane(name: str) -> None:
        slots = bound._slots()
        outputs[name] = [bound.run(batch)[OUTPUT_NAME] for batch in batches]
        options = [slot.bindings[CLASSIFY].options for slot in slots.values() if slot.bindings]
        ids[name] = [o.get_run_config_entry("gpu_graph_id") for o in options if o is not None]

    threads = [threading.Thread(target=lane, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Only bucket 2 ran: one graph per lane of the two, out of 0..3.
    assert len(ids["a"]) == len(ids["b"]) == 1
    assert set(ids["a"] + ids["b"]) <= {"0", "1", "2", "3"}
    assert ids["a"] != ids["b"]
    # Other outputs replay no graph: a graph replays the buffers it was captured with.
    bound.run(batches[0], frozenset({OUTPUT_NAME, "embedding"}))
    embedded = bound._slots()[2].bindings[frozenset({OUTPUT_NAME, "embedding"})].options
    assert embedded is not None
    assert embedded.get_run_config_entry("gpu_graph_id") == "-1"
    for name in ("a", "b"):
        for batch, output in zip(batches, outputs[name], strict=True):
            np.testing.assert_allclose(output, plain.predict(batch), atol=1e-6)


def test_adaptive_spinning_opens_a_second_cpu_session_that_answers_the_same(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def load(spinning: str, workers: int = 1) -> OnnxModel:
        settings = make_settings(ort_spinning=spinning, workers=workers, concurrent_batches=0)
        return OnnxModel.load(runtime_config(settings))

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("app.process.cpus.CGROUP_CPU_MAX", tmp_path / "no-cgroup")
    model = load("adaptive")  # one thread a run under load: the lone batch gets both cores
    assert model.adaptive
    assert not load("off").adaptive
    assert not load("adaptive", workers=2).adaptive  # one core each: no pool that could spin
    model.bind([1, 2])
    model.warm_up([1, 2])
    model.warm_up_alone([1, 2])
    images = np.random.default_rng(2).integers(0, 256, (2, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    every = frozenset(SERVED_OUTPUTS)
    assert model.outputs == every  # the test model has them all, as export writes them
    alone, shared = model.run_alone(images, every), model.run(images, every)
    assert set(alone) == set(shared) == every
    assert set(model.run(images)) == {OUTPUT_NAME}  # what a classification copies back
    for name in SERVED_OUTPUTS:
        np.testing.assert_allclose(alone[name], shared[name], atol=1e-6)
