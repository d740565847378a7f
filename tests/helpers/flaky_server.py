"""A real ASGI app for the client tests: 503 with Retry-After for the first answers, then 200.

``python -m uvicorn tests.helpers.flaky_server:app``; FLAKY_REFUSALS sets how many 503s each
filename gets
(``always`` for every request), FLAKY_RETRY_AFTER the header's value. ``GET /log`` lists
(filename, monotonic time) for every /predict request, so a test can see how the client waited.
"""

from __future__ import annotations

import os
import time
from collections import Counter

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

REFUSALS = os.environ.get("FLAKY_REFUSALS", "2")
RETRY_AFTER = os.environ.get("FLAKY_RETRY_AFTER", "1")
seen: Counter[str] = Counter()
log: list[tuple[str, float]] = []


async def predict(request: Request) -> JSONResponse:
    form = await request.form()
    upload = form["file"]
    name = str(getattr(upload, "filename", ""))
    log.append((name, time.monotonic()))
    seen[name] += 1
    if REFUSALS == "always" or seen[name] <= int(REFUSALS):
        error = {"code": "overloaded", "message": "queue full", "request_id": "flaky"}
        return JSONResponse({"error": error}, 503, headers={"Retry-After": RETRY_AFTER})
    prediction = {"label": "ok", "class_id": 0, "score": 1.0}
    result = {"filename": name, "predictions": [prediction]}
    return JSONResponse({"model_name": "flaky", "model_version": "1", "results": [result]})


async def requests_log(request: Request) -> JSONResponse:
    return JSONResponse(log)


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/log", requests_log)])
