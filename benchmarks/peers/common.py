"""What every peer server shares with ``app/``: the ONNX contract (``core.contract``), the
decode function (``core.preprocess``), the ONNX Runtime session options and the top-k answer.
Runs inside ``.venv-peers``, so it needs only numpy, Pillow and onnxruntime.

Configuration comes from ``PEER_*`` environment variables, because BentoML and Ray load the
service module themselves and pass no arguments to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core.contract import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from core.preprocess import decode

TOP_K = 5


@dataclass(frozen=True)
class PeerConfig:
    model_path: Path
    port: int
    max_batch_size: int
    batch_wait_s: float

    @classmethod
    def from_env(cls) -> PeerConfig:
        return cls(
            model_path=Path(os.environ["PEER_MODEL_PATH"]),
            port=int(os.environ["PEER_PORT"]),
            max_batch_size=int(os.environ.get("PEER_MAX_BATCH_SIZE", "8")),
            batch_wait_s=float(os.environ.get("PEER_BATCH_WAIT_MS", "2")) / 1000,
        )


def session_options() -> ort.SessionOptions:
    """The options a session opened by hand has, with ``app.runtimes.onnxruntime._open_session``'s
    inter-op and optimisation choices: inter-op parallelism off, every graph optimisation on
    (a test checks they stay equal). intra_op_num_threads=0 lets ONNX Runtime use one thread
    per physical core, as a user's own session would; ours, by design, runs one thread per
    lane under load and every core for a lone batch (``app.main``).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class Classifier:
    """The ONNX artifact with its labels and preprocessing recipe, read from its metadata."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)

    def decode(self, data: bytes) -> np.ndarray:
        return decode(data, self.metadata.recipe)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """uint8[N, S, S, 3] -> probabilities float32[N, C]."""
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: crops})[0])

    def answer(self, probabilities: np.ndarray) -> dict[str, Any]:
        """One image's response body: the top-k classes, as ``app`` answers them."""
        order = np.argsort(-probabilities, kind="stable")[:TOP_K]  # as app/http/routes.py
        return {
            "predictions": [
                {
                    "label": self.metadata.labels[i],
                    "class_id": int(i),
                    "score": round(float(probabilities[i]), 6),
                }
                for i in order
            ]
        }
