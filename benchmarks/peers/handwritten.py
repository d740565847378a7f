"""What a user writes by hand: FastAPI + ONNX Runtime, one image per model call, no batching.

    PEER_MODEL_PATH=model.onnx PEER_PORT=8001 \
        .venv-peers/bin/python -m benchmarks.peers.handwritten

Written the way FastAPI's documentation shows it: a plain ``def`` path operation, which FastAPI
runs in its thread pool so the blocking decode and ``session.run`` keep the event loop free
(https://fastapi.tiangolo.com/async/#path-operation-functions), and the upload as an
``UploadFile`` form field (https://fastapi.tiangolo.com/tutorial/request-files/). The model is
opened in a lifespan handler (https://fastapi.tiangolo.com/advanced/events/). One uvicorn
worker, as ``python -m app`` runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, UploadFile

from benchmarks.peers.common import Classifier, PeerConfig

CONFIG = PeerConfig.from_env()
models: dict[str, Classifier] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    models["classifier"] = Classifier(CONFIG.model_path)
    yield
    models.clear()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
def predict(image: UploadFile) -> dict[str, Any]:
    classifier = models["classifier"]
    crop = classifier.decode(image.file.read())
    return classifier.answer(classifier.predict(crop[None])[0])


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=CONFIG.port, log_level="warning")
