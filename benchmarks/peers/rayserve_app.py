"""Ray Serve with ``@serve.batch`` on a local Ray instance.

    PEER_MODEL_PATH=model.onnx PEER_PORT=8004 \
        .venv-peers/bin/python -m benchmarks.peers.rayserve_app

Follows Ray Serve's dynamic request batching guide
(https://docs.ray.io/en/latest/serve/advanced-guides/dyn-req-batch.html): an ``async``
``@serve.batch`` method that takes a list and returns a list of the same length, called with
one item per HTTP request from the deployment's ``__call__`` (a starlette ``Request``,
https://docs.ray.io/en/latest/serve/http-guide.html). ``max_batch_size`` and
``batch_wait_timeout_s`` are ours (8 images, 2 ms); the guide's tuning tips (a power of 2 for
the batch, a wait well under the latency target) hold for both. ``max_ongoing_requests`` is
raised from its default of 5, which is below ``max_batch_size`` so a batch could never fill
(Ray 2.60 warns about it at start-up, ``ray/serve/batching.py``), to more than the benchmark's
highest concurrency: with one replica, a router that finds it full retries with back-off, and
a cap of two batches (16) cut Ray to 4 images/s at 256 clients on the digits model where 256
gave 90 (quick smoke runs, same machine), so ``@serve.batch``'s queue is left to be the only
queue, as in LitServe and BentoML. One replica (the default), HTTP on
127.0.0.1 through Serve's proxy. The Ray dashboard is left out: it is not part of serving and
would only add CPU and memory to Ray's side of the table.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np
import ray
from ray import serve
from starlette.datastructures import UploadFile
from starlette.requests import Request

from benchmarks.peers.common import Classifier, PeerConfig

CONFIG = PeerConfig.from_env()
MAX_ONGOING_REQUESTS = 1024


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class ImageClassifier:
    def __init__(self) -> None:
        self.classifier = Classifier(CONFIG.model_path)

    @serve.batch(max_batch_size=CONFIG.max_batch_size, batch_wait_timeout_s=CONFIG.batch_wait_s)
    async def classify(self, images: list[bytes]) -> list[dict[str, Any]]:
        crops = np.stack([self.classifier.decode(data) for data in images])
        return [self.classifier.answer(row) for row in self.classifier.predict(crops)]

    async def __call__(self, request: Request) -> dict[str, Any]:
        upload = (await request.form())["image"]
        if not isinstance(upload, UploadFile):
            raise TypeError("the image must be sent as a file field")
        answer: dict[str, Any] = await self.classify(await upload.read())
        return answer


def main() -> None:
    ray.init(address="local", include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": CONFIG.port})
    # serve.deployment turns the class into a Deployment; mypy cannot see that without Ray.
    serve.run(ImageClassifier.bind(), route_prefix="/predict")  # type: ignore[attr-defined]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
