"""Untrusted bytes in, safe PIL images out: upload size and type limits, bomb-proof decoding, thumbnails.

Order matters for safety: the request body is capped while it streams in (BodyLimitMiddleware), the
upload is capped again while read, the image *header* is parsed lazily to check the pixel count, and
only then are the pixels decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xmr.serve.errors import BadImage, TooLarge, UnsupportedMediaType, error_body

# Room for multipart boundaries and the small text fields sent next to the file.
FORM_OVERHEAD_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024
ACCEPTED_TYPES = ("application/octet-stream", "")  # plus any image/*; browsers send "" for unknown files
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError,
                 Image.DecompressionBombError)


def check_content_type(content_type: str | None) -> None:
    """Refuse uploads declared as something other than an image (415)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media.startswith("image/") or media in ACCEPTED_TYPES:
        return
    raise UnsupportedMediaType(f"the uploaded file is {media!r}; send an image (image/jpeg, image/png, ...)")


async def read_upload(upload: Any, max_bytes: int) -> bytes:
    """Read a Starlette UploadFile in chunks, stopping as soon as it exceeds `max_bytes` (413)."""
    check_content_type(getattr(upload, "content_type", None))
    chunks, total = [], 0
    while True:
        chunk = await upload.read(READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"the upload exceeds the limit of {_mib(max_bytes)}")
        chunks.append(chunk)
    if total == 0:
        raise BadImage("the uploaded file is empty")
    return b"".join(chunks)


def open_checked(source: io.BytesIO | Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images whose declared size exceeds `max_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            raise BadImage("the file is not an image in a known format (JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TooLarge(f"the image has more pixels than the limit of {max_pixels / 1e6:g} megapixels") from None
        except DECODE_ERRORS as err:
            raise BadImage(f"the image header is invalid ({err})") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise BadImage(f"the image has an empty size ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise TooLarge(f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
                       f"the limit is {max_pixels / 1e6:g} megapixels")
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode uploaded bytes into an upright RGB image; BadImage / TooLarge on anything else."""
    image = open_checked(io.BytesIO(data), max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise TooLarge(f"the image exceeds the limit of {max_pixels / 1e6:g} megapixels") from None
    except DECODE_ERRORS as err:
        raise BadImage(f"the image could not be decoded; it may be truncated or corrupt ({err})") from None
    finally:
        image.close()


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and flatten transparency onto white (what a person sees)."""
    try:
        image = ImageOps.exif_transpose(image) or image
    except DECODE_ERRORS:
        pass  # a broken EXIF block should not make a readable image unusable
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def load_indexed_image(path: Path, max_pixels: int) -> Image.Image:
    """Decode an indexed image (trusted more than uploads, but still size-checked)."""
    image = open_checked(path, max_pixels)
    try:
        image.load()
        return to_rgb(image)
    finally:
        image.close()


def make_thumbnail(path: Path, size: int, max_pixels: int, quality: int = 85) -> bytes:
    """A JPEG whose longest side is at most `size`; JPEGs are decoded at reduced scale (draft mode)."""
    image = open_checked(path, max_pixels)
    try:
        image.draft("RGB", (size, size))  # a no-op for formats without scaled decoding
        image.load()
        rgb = to_rgb(image)
    finally:
        image.close()
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class BodyLimitMiddleware:
    """Cap request bodies while they stream in, before Starlette spools multipart files to disk.

    A declared Content-Length over the limit is refused without reading; a body that grows past the
    limit raises HTTPException(413) from `receive`, which FastAPI passes through to the error handlers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            message = f"the request body ({_mib(declared)}) exceeds the limit of {_mib(self.max_bytes)}"
            await JSONResponse(error_body("too_large", message), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"the request body exceeds the limit of {_mib(self.max_bytes)}")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
