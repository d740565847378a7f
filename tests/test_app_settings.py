from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.model_path == Path("artifacts/model.onnx")
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.limits.formats == ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_WAIT_MS", "3.5")
    monkeypatch.setenv("RESNET_SERVE_ALLOWED_FORMATS", '["PNG", "JPEG"]')
    monkeypatch.setenv("RESNET_SERVE_PROVIDERS", "cpu")
    settings = Settings()
    assert settings.max_wait_ms == 3.5
    assert settings.limits.formats == ("PNG", "JPEG")
    assert settings.providers == "cpu"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("RESNET_SERVE_MAX_WAIT", "3", "RESNET_SERVE_MAX_WAIT"),
        ("RESNET_SERVE_PROVIDERS", "tpu", "providers"),
        ("RESNET_SERVE_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("RESNET_SERVE_ALLOWED_FORMATS", '["PSD"]', "PSD"),
        ("RESNET_SERVE_MAX_QUEUE_IMAGES", "4", "max_images_per_request=16"),
    ],
    ids=["misspelt-name", "unknown-provider", "zero-batch", "unknown-format", "queue-too-small"],
)
def test_bad_configuration_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=fragment):
        Settings()
