"""The protocol's JSON: the inference request header and the metadata answers.

Field names are the protocol's (kserve ``required_api.md``); unknown fields are ignored, as
Triton does, so clients that add their own parameters keep working.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description='binary_data_size: the length of its binary data; content_type: "url" '
        "where its BYTES elements are image URLs for the server to fetch (RESNET_SERVE_URL_ALLOW)",
    )
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable dimension (the batch)")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ProtocolError(BaseModel):
    error: str
