"""BentoML with adaptive batching.

    PEER_MODEL_PATH=model.onnx PEER_PORT=8003 .venv-peers/bin/bentoml serve \
        benchmarks.peers.bentoml_service:ImageClassifier --host 127.0.0.1 --port 8003

Follows BentoML's adaptive-batching guide
(https://docs.bentoml.com/en/latest/guides/adaptive-batching.html): one
``@bentoml.api(batchable=True)`` method that takes a list along batch dimension 0 and returns a
list of the same length; BentoML's dispatcher merges concurrent requests into one call and
adapts the batch window to the measured latency, so there is no fixed wait to set.
``max_batch_size`` is ours (8); ``max_latency_ms`` stays at its documented default (60 s).
Files arrive as ``pathlib.Path`` multipart fields
(https://docs.bentoml.com/en/latest/build-with-bentoml/iotypes.html), so the bytes
reach our decode function unchanged (a ``PIL.Image`` input would decode with BentoML's own
code). One worker, BentoML's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from benchmarks.peers.common import Classifier, PeerConfig

CONFIG = PeerConfig.from_env()


@bentoml.service
class ImageClassifier:
    def __init__(self) -> None:
        self.classifier = Classifier(CONFIG.model_path)

    @bentoml.api(route="/predict", batchable=True, max_batch_size=CONFIG.max_batch_size)
    def predict(self, image: list[Path]) -> list[dict[str, Any]]:
        crops = np.stack([self.classifier.decode(path.read_bytes()) for path in image])
        return [self.classifier.answer(row) for row in self.classifier.predict(crops)]
