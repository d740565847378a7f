"""Request body -> raw image bytes: multipart files, or one image as the whole body.

The request byte limit is enforced underneath, while the body streams in (app.middleware);
this module adds the per-image and per-request image-count limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import EmptyUpload, InvalidMultipart, PayloadTooLarge, UnsupportedMediaType
from app.settings import Settings


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def read_uploads(request: Request, settings: Settings) -> list[Upload]:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _read_multipart(request, settings)
    elif media_type.startswith("image/"):
        uploads = [Upload(None, await _read_raw(request, settings))]
    elif not media_type and request.headers.get("content-length", "0") == "0":
        raise EmptyUpload("no image: send multipart/form-data files or an image/* body")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r} is not accepted; "
            "send multipart/form-data files or a single image with an image/* type"
        )
    return uploads


async def _read_raw(request: Request, settings: Settings) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_image_bytes:
            raise _image_too_large("the request body", size, settings.max_image_bytes)
        chunks.append(chunk)
    if not size:
        raise EmptyUpload("the request body is empty (0 bytes)")
    return b"".join(chunks)


async def _read_multipart(request: Request, settings: Settings) -> list[Upload]:
    limit = settings.max_images_per_request
    parser = MultiPartParser(request.headers, request.stream(), max_files=limit, max_fields=limit)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Both "Too many files" and "Too many fields" come from this one setting.
        hint = f" (max_images_per_request={limit})" if exc.message.startswith("Too many") else ""
        raise InvalidMultipart(f"cannot parse the multipart body: {exc.message}{hint}") from exc
    try:
        uploads = [await _read_part(name, part, settings) for name, part in form.multi_items()]
    finally:
        await form.close()
    if not uploads:
        raise EmptyUpload("the multipart body has no files")
    return uploads


async def _read_part(name: str, part: UploadFile | str, settings: Settings) -> Upload:
    if not isinstance(part, UploadFile):
        raise InvalidMultipart(
            f"form field {name!r} is not a file; send images as file parts (with a filename)"
        )
    if part.size is not None and part.size > settings.max_image_bytes:
        raise _image_too_large(f"file {part.filename!r}", part.size, settings.max_image_bytes)
    data = await part.read()
    if not data:
        raise EmptyUpload(f"file {part.filename!r} is empty (0 bytes)")
    return Upload(part.filename, data)


def _image_too_large(what: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} has at least {size} bytes, over max_image_bytes={limit}")
