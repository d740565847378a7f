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

# The operations that take images as /predict does, and those whose `model` and `version` query
# parameters name a served version.
UPLOADS = ("/predict", "/embed", "/explain")
NAMED = (*((path, "post") for path in UPLOADS), ("/v1/model", "get"))


def install_schema_bounds(app: FastAPI, max_images_per_request: int, default_top_k: int) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = copy.deepcopy(build())
        return _bounded(schema, app, max_images_per_request, default_top_k)

    app.openapi = openapi  # type: ignore[method-assign]


def _bounded(
    schema: dict[str, Any], app: FastAPI, max_images_per_request: int, default_top_k: int
) -> dict[str, Any]:
    for path in UPLOADS:
        body = schema["paths"][path]["post"]["requestBody"]
        multipart = body["content"]["multipart/form-data"]["schema"]
        multipart["properties"]["files"]["maxItems"] = max_images_per_request
        body["content"]["application/json"]["schema"]["properties"]["urls"]["maxItems"] = (
            max_images_per_request
        )
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
    if len({s.name for s in ready}) != 1:
        return schema  # with several models, each model's own classes bound top_k and class_id
    classes = ready[0].metadata.num_classes
    bounds = {
        "top_k": {"minimum": 1, "maximum": classes, "default": min(default_top_k, classes)},
        "class_id": {"minimum": 0, "maximum": classes - 1},
    }
    for path in ("/predict", "/explain"):
        for parameter in schema["paths"][path]["post"]["parameters"]:
            if parameter["name"] in bounds:
                title = parameter["name"].replace("_", " ").title()
                parameter["schema"] = {"type": "integer", **bounds[parameter["name"]]}
                parameter["schema"]["title"] = title
    return schema
