"""The parts of the OpenAPI document that depend on settings and the models being served.

FastAPI builds the document once; each request for it then gets a copy with the bounds the server
enforces now filled in (the images per request, top_k's range, the model names and versions being
served), so generated clients and fuzzers see them, and a model loaded later shows up.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from app.repository.models import Models

# The operations whose `model` and `version` query parameters name a served version.
NAMED = (("/predict", "post"), ("/v1/model", "get"))


def install_schema_bounds(app: FastAPI, max_images_per_request: int, default_top_k: int) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = copy.deepcopy(build())
        return _bounded(schema, app, max_images_per_request, default_top_k)

    app.openapi = openapi  # type: ignore[method-assign]


def _bounded(
    schema: dict[str, Any], app: FastAPI, max_images_per_request: int, default_top_k: int
) -> dict[str, Any]:
    predict = schema["paths"]["/predict"]["post"]
    multipart = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    multipart["properties"]["files"]["maxItems"] = max_images_per_request
    models: Models | None = getattr(app.state.service, "models", None)
    ready = models.ready() if models is not None else []
    if not ready:
        return schema
    for path, method in NAMED:
        for parameter in schema["paths"][path][method]["parameters"]:
            if parameter["name"] == "model":
                parameter["schema"] = {"type": "string", "enum": sorted({s.name for s in ready})}
            elif parameter["name"] == "version":
                versions = sorted({s.version for s in ready})
                parameter["schema"] = {"type": "string", "enum": versions}
    for parameter in predict["parameters"]:
        # One model: its classes bound top_k; with several, each model's own do.
        if parameter["name"] == "top_k" and len({s.name for s in ready}) == 1:
            classes = ready[0].metadata.num_classes
            parameter["schema"] = {
                "type": "integer",
                "minimum": 1,
                "maximum": classes,
                "default": min(default_top_k, classes),
                "title": "Top K",
            }
    return schema
