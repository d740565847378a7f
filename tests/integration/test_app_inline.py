"""A request alone on the server decodes and runs on the event loop once both are known to be
fast (``inline_max_ms``), and on the decode thread and an inference lane otherwise."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from app.repository.configs import runtime_config
from app.runtimes.base import Outputs
from app.runtimes.onnxruntime import OnnxModel
from app.settings import Settings
from core import preprocess
from tests.conftest import Serve
from tests.helpers.models import image_bytes

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("inline_max_ms", [60_000.0, 0.0], ids=["inline", "never"])
async def test_a_lone_request_moves_onto_the_event_loop_once_its_work_is_known_fast(
    serve: Serve,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    inline_max_ms: float,
) -> None:
    model = OnnxModel.load(runtime_config(make_settings()))
    assert model.adaptive  # a lone batch has a session of its own
    decoded_on: list[str] = []
    ran_on: list[str] = []
    run_alone = model.run_alone

    def recorded_decode(*args: Any) -> preprocess.Decoded:
        decoded_on.append(threading.current_thread().name)
        return preprocess.decode_counted(*args)

    def recorded_run(images: np.ndarray, *args: Any) -> Outputs:
        ran_on.append(threading.current_thread().name)
        return run_alone(images, *args)

    monkeypatch.setattr("app.pipeline.pipeline.decode_counted", recorded_decode)
    monkeypatch.setattr(model, "run_alone", recorded_run)
    async with serve(model, inline_max_ms=inline_max_ms) as client:
        ran_on.clear()  # warm-up's runs
        for seed in range(3):
            upload = [("file", ("x.png", image_bytes(seed), "image/png"))]
            response = await client.post("/predict", files=upload)
            assert response.status_code == 200
    loop = threading.current_thread().name
    # The first decode and the first lone run of a size are measured on their threads.
    assert decoded_on[0] != loop
    assert ran_on[0] != loop
    assert len(ran_on) == 3  # every lone request ran on the lone-batch session
    if inline_max_ms:
        assert decoded_on[1:] == [loop, loop]
        assert ran_on[1:] == [loop, loop]
    else:
        assert loop not in decoded_on + ran_on
