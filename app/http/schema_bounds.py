"""The parts of the OpenAPI document that depend on settings and the served model.

FastAPI builds the document once, on the first request for it, when the model is loaded;
this fills in the bounds the server enforces, so generated clients and fuzzers see them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def install_schema_bounds(app: FastAPI, max_images_per_request: int, default_top_k: int) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _bounded(build(), app, max_images_per_request, default_top_k)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _bounded(
    schema: dict[str, Any], app: FastAPI, max_images_per_request: int, default_top_k: int
) -> dict[str, Any]:
    predict = schema["paths"]["/predict"]["post"]
    multipart = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    multipart["properties"]["files"]["maxItems"] = max_images_per_request
    classifier = getattr(app.state, "classifier", None)
    for parameter in predict["parameters"]:
        if parameter["name"] == "top_k" and classifier is not None:
            classes = classifier.metadata.num_classes
            parameter["schema"] = {
                "type": "integer",
                "minimum": 1,
                "maximum": classes,
                "default": min(default_top_k, classes),
                "title": "Top K",
            }
    return schema
