"""Image loading with errors that name the file (missing, corrupt, truncated or absurdly large)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from xmr.errors import DataError

# Far above any pedestrian crop; guards against decompression bombs with our own clear message
# (PIL's own limit, Image.MAX_IMAGE_PIXELS, is global state and only warns below twice its value).
MAX_PIXELS = 100_000_000

# Errors PIL raises for unreadable data: truncation is an OSError, some plugins raise SyntaxError/ValueError.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def _check_size(im: Image.Image, path: str | os.PathLike, max_pixels: int) -> None:
    w, h = im.size
    if w * h > max_pixels:
        raise DataError(
            f"image {path} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            "resize it (or raise max_pixels if this is intended)"
        )


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `path` fully decoded as an RGB PIL image.

    Raises DataError naming the path when the file is missing, not an image, corrupt or truncated,
    or has more than `max_pixels` pixels.
    """
    try:
        with Image.open(path) as im:
            _check_size(im, path, max_pixels)
            im.load()  # decode now so truncation surfaces here, not later inside a transform
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"image path is a directory, not a file: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely: {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def verify_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> None:
    """Check that `path` is a readable image: PIL's verify() (checksums) plus a full decode.

    verify() alone misses truncated JPEGs, so the image is re-opened and decoded as well.
    Raises DataError naming the path.
    """
    try:
        with Image.open(path) as im:
            _check_size(im, path, max_pixels)
            im.verify()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely: {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
    load_image(path, max_pixels=max_pixels)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when `path` exists and is a regular file (cheap check used for up-front validation)."""
    return Path(path).is_file()
