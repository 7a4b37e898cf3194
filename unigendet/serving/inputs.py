"""What a ``POST /detect`` request holds, read defensively: the body within its size limit, the images it names
(multipart file parts, or JSON ``{"images": [{"id": ..., "data": <base64>}, ...]}``), each decoded within the
decode limits. Every problem becomes a :class:`RequestError` with an HTTP status, a short code and a message
naming the problem (and the image, when it is about one image).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from unigendet.data.images import DecodeLimits, decode_image_bytes
from unigendet.data.quality import BadSample
from unigendet.serving.config import LimitsConfig

# Non-file form fields are names and small texts; their size is bounded well below any image.
_MAX_FIELD_BYTES = 64 * 2**10


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx/5xx), a short machine-readable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str, image: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.image = image

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.image is not None:
            out["image"] = self.image
        return out


@dataclass(frozen=True)
class EncodedImage:
    """One image of a request, still encoded: the client's id for it and its bytes."""

    id: str
    data: bytes


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body; 413 as soon as it is known to exceed ``max_bytes`` (from Content-Length, before reading,
    or while reading a body sent without one)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, "request_too_large",
                           f"request body of {declared} bytes exceeds limits.max_request_bytes={max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, "request_too_large",
                               f"request body exceeds limits.max_request_bytes={max_bytes}")
    return bytes(body)


async def encoded_images(headers: Headers, body: bytes, limits: LimitsConfig) -> list[EncodedImage]:
    """The images of a multipart or JSON request body, at least one and at most ``max_images_per_request``."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        images = await _multipart_images(headers, body)
    elif content_type == "application/json" or content_type.endswith("+json"):
        images = _json_images(body)
    else:
        raise RequestError(415, "unsupported_media_type",
                           f"content type {content_type or '(none)'!r} is not supported: send multipart/form-data "
                           "file parts or application/json {\"images\": [{\"id\": ..., \"data\": <base64>}]}")
    if not images:
        raise RequestError(422, "no_images", "the request holds no image")
    if len(images) > limits.max_images_per_request:
        raise RequestError(413, "too_many_images", f"{len(images)} images in one request exceeds "
                           f"limits.max_images_per_request={limits.max_images_per_request}")
    return images


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _multipart_images(headers: Headers, body: bytes) -> list[EncodedImage]:
    """Every file part of a multipart body, whatever its field name; its id is its file name."""
    parser = MultiPartParser(headers, _once(body), max_part_size=_MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise RequestError(400, "malformed_multipart", f"malformed multipart body: {err.message}") from None
    try:
        images = []
        for field_name, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = value.filename or f"{field_name}[{len(images)}]"
                images.append(EncodedImage(name, await value.read()))
        return images
    finally:
        await form.close()


def _json_images(body: bytes) -> list[EncodedImage]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "malformed_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "images" not in data:
        raise RequestError(422, "missing_field", "the JSON body must be an object with an \"images\" list")
    entries = data["images"]
    if not isinstance(entries, list):
        raise RequestError(422, "invalid_field", f"\"images\" must be a list, got {type(entries).__name__}")
    return [_json_image(i, entry) for i, entry in enumerate(entries)]


def _json_image(index: int, entry: Any) -> EncodedImage:
    where = f"images[{index}]"
    if not isinstance(entry, dict):
        raise RequestError(422, "invalid_field", f"{where} must be an object with \"data\" (base64) and an "
                           "optional \"id\"")
    image_id = entry.get("id", str(index))
    if not isinstance(image_id, str):
        raise RequestError(422, "invalid_field", f"{where}.id must be a string, got {type(image_id).__name__}")
    if "data" not in entry:
        raise RequestError(422, "missing_field", f"{where}.data is missing (the image file as base64)",
                           image=image_id)
    text = entry["data"]
    if not isinstance(text, str):
        raise RequestError(422, "invalid_field", f"{where}.data must be a base64 string", image=image_id)
    if text.startswith("data:") and "," in text:  # a data URL, as browsers write them
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "bad_base64", f"{where}.data is not valid base64: {err}", image=image_id) from None
    return EncodedImage(image_id, data)


def decode_images(images: list[EncodedImage], limits: LimitsConfig) -> list[Image.Image]:
    """RGB images; 413 for an image over the byte or pixel limit (the pixel count is read from the header, so a
    decompression bomb is refused unopened), 422 for anything that does not decode as an image."""
    decode_limits = DecodeLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_pixels)
    out = []
    for image in images:
        try:
            out.append(decode_image_bytes(image.data, f"image {image.id!r}", decode_limits))
        except BadSample as bad:
            if bad.reason == "too_large":
                raise RequestError(413, "image_too_large", _limit_names(bad.detail), image=image.id) from None
            # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which tells the client nothing.
            detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", bad.detail)
            raise RequestError(422, "unreadable_image", f"not a readable image: {detail}", image=image.id) from None
    return out


def _limit_names(message: str) -> str:
    """The decoder's message with the service's names of its limits."""
    return (message.replace("max_image_pixels=", "limits.max_pixels=")
            .replace("max_image_bytes=", "limits.max_image_bytes="))
