"""Request body -> raw image bytes: multipart files, or one image as the whole body.

The request byte limit is enforced underneath, while the body streams in (app.http.intake);
this module adds the per-image and per-request image-count limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import InvalidMultipart
from app.pipeline.pipeline import Image
from core.errors import EmptyUpload, PayloadTooLarge, UnsupportedMediaType


@dataclass(frozen=True)
class UploadLimits:
    max_image_bytes: int
    max_images_per_request: int


async def read_uploads(request: Request, limits: UploadLimits) -> list[Image]:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _read_multipart(request, limits)
    elif media_type.startswith("image/"):
        uploads = [Image(None, await _read_raw(request, limits))]
    elif not media_type and request.headers.get("content-length", "0") == "0":
        raise EmptyUpload("no image: send multipart/form-data files or an image/* body")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r} is not accepted; "
            "send multipart/form-data files or a single image with an image/* type"
        )
    return uploads


async def _read_raw(request: Request, limits: UploadLimits) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_image_bytes:
            raise _image_too_large("the request body", size, limits.max_image_bytes)
        chunks.append(chunk)
    if not size:
        raise EmptyUpload("the request body is empty (0 bytes)")
    return b"".join(chunks)


async def _read_multipart(request: Request, limits: UploadLimits) -> list[Image]:
    limit = limits.max_images_per_request
    parser = MultiPartParser(request.headers, request.stream(), max_files=limit, max_fields=limit)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Both "Too many files" and "Too many fields" come from this one setting.
        hint = f" (max_images_per_request={limit})" if exc.message.startswith("Too many") else ""
        raise InvalidMultipart(f"cannot parse the multipart body: {exc.message}{hint}") from exc
    try:
        uploads = [await _read_part(name, part, limits) for name, part in form.multi_items()]
    finally:
        await form.close()
    if not uploads:
        raise EmptyUpload("the multipart body has no files")
    return uploads


async def _read_part(name: str, part: UploadFile | str, limits: UploadLimits) -> Image:
    if not isinstance(part, UploadFile):
        raise InvalidMultipart(
            f"form field {name!r} is not a file; send images as file parts (with a filename)"
        )
    if part.size is not None and part.size > limits.max_image_bytes:
        raise _image_too_large(f"file {part.filename!r}", part.size, limits.max_image_bytes)
    data = await part.read()
    if not data:
        raise EmptyUpload(f"file {part.filename!r} is empty (0 bytes)")
    return Image(part.filename, data)


def _image_too_large(what: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} has at least {size} bytes, over max_image_bytes={limit}")
