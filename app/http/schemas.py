"""Response bodies; declared here so /docs and /openapi.json describe exactly what is sent."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str
    class_id: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0, description="Probability from the model's softmax")


class ImageResult(BaseModel):
    filename: str | None = Field(description="The multipart filename; null for a raw body")
    predictions: list[Prediction] = Field(description="Top-k, highest score first")


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    results: list[ImageResult] = Field(description="One entry per image, in request order")

    model_config = {"protected_namespaces": ()}


class EmbeddingResult(BaseModel):
    filename: str | None = Field(description="The multipart filename; null for a raw body")
    embedding: list[float] = Field(
        description="The pooled features the classifier reads (2048 for a ResNet-50), "
        "L2-normalised unless normalize=false"
    )


class EmbedResponse(BaseModel):
    model_name: str
    model_version: str
    results: list[EmbeddingResult] = Field(description="One entry per image, in request order")

    model_config = {"protected_namespaces": ()}


class Heatmap(BaseModel):
    class_id: int = Field(ge=0, description="The class drawn: the top one, or class_id")
    label: str
    width: int = Field(ge=1, description="The PNG's width: the image's, at most 1024")
    height: int = Field(ge=1, description="The PNG's height: the image's shape, scaled as width")
    png: str = Field(
        description="Base64 RGBA PNG of the image's shape: the class activation map over the "
        "centre crop the model saw, coloured blue (low) to red (high), transparent elsewhere; "
        "stretch it over the image"
    )


class ExplainedResult(ImageResult):
    heatmap: Heatmap


class ExplainResponse(BaseModel):
    model_name: str
    model_version: str
    results: list[ExplainedResult] = Field(description="One entry per image, in request order")

    model_config = {"protected_namespaces": ()}


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class Batching(BaseModel):
    max_batch_size: int
    batch_limit: int = Field(
        description="The most images one batch takes: max_batch_size, or less where warm-up "
        "timed no lower cost per image for bigger batches (flat_batch_ms)"
    )
    max_wait_ms: float
    max_queue_images: int
    request_timeout_ms: float
    warmed_batch_sizes: list[int]


class InputSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int | str] = Field(description='e.g. ["N", 224, 224, 3]: RGB, channels last')


class Candidate(BaseModel):
    backend: str
    precision: str
    images_per_s: float | None = Field(None, description="Timed, at the largest batch timed")
    images_per_s_by_batch: dict[int, float] | None = Field(
        None, description="Timed, at each batch size timed"
    )
    cached: bool | None = Field(
        None, description="Whether the timings came from the tuning cache (docs/backends.md)"
    )
    skipped: str | None = Field(
        None,
        description="Why it was not tried, failed its check, or was not opened beside another",
    )
    batch_sizes: list[int] | None = Field(None, description="The batch sizes it serves")
    chosen: bool = Field(description="Whether it serves (some batch sizes)")


class Runtime(BaseModel):
    name: str = Field(
        description="onnxruntime or openvino (onnxruntime+openvino: each serves some batch sizes)"
    )
    candidates: list[Candidate] = Field(
        description="What the backend setting tried before choosing (docs/backends.md)"
    )


class ModelDescription(BaseModel):
    name: str
    version: str = Field(
        description="The repository folder's version, or the model file's build (metadata)"
    )
    build: str = Field(description="model_version in the ONNX metadata: the checkpoint's hash")
    architecture: str
    precision: str = Field(
        description="What it computes in: fp32, fp16, bf16 (an fp32 file) or int8 (fp32+bf16: "
        "each for some batch sizes, backend.candidates says which)"
    )
    file_precision: str = Field(description="The file's precision (its metadata)")
    num_classes: int
    labels: list[str]
    input: InputSpec
    preprocessing: dict[str, Any]
    accuracy: dict[str, Any] | None
    source_sha256: str
    provider: str
    backend: Runtime
    batching: Batching
    rollout: dict[str, Any] | None = Field(
        None,
        description="The model's last rollout, as GET /v2/repository/models/{name}/rollout "
        "gives it (docs/rollouts.md); null where it has had none since the server started",
    )


class ModelList(BaseModel):
    default_model: str | None = Field(
        description="Where requests naming no model go; null when several models are served and"
        " none is the default (each request names one)"
    )
    models: list[ModelDescription] = Field(description="Every ready version, by name then version")
    images_by_url: bool = Field(
        description="Whether the server fetches images by URL (RESNET_SERVE_URL_ALLOW is set): "
        'JSON {"urls": [...]} on /predict, /embed and /explain, and the protocol\'s BYTES input '
        'with content_type "url". Which hosts it allows is not said'
    )
