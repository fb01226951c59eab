"""Images uploaded from the browser: bytes in, a decoded PIL image out, or one line saying what is wrong.

Only the bytes are used: the browser's file name never becomes a path (an image kept beside the outputs is named
by the hash of its bytes). An upload larger than the byte limit, one that is not an image, one with more pixels
than the pixel limit (a decompression bomb) are refused (a mask's size is the request's rule, ``check_request``).
"""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from ldm.core.errors import UserError

MEBIBYTE = 2**20
DEFAULT_MAX_UPLOAD_MB = 8.0
DEFAULT_MAX_PIXELS = 4096 * 4096
HASH_CHARS = 12  # of the SHA-256 of an upload, in the name it is kept under
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)  # what PIL raises for bytes that are not a readable image


class UploadError(UserError, ValueError):
    """An uploaded file that is not a usable image."""


def read_image(data: bytes, what: str, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an upload (``what`` names the form field in messages) into a fully loaded PIL image."""
    if len(data) > max_bytes:
        raise UploadError(f"the {what} is {len(data) / MEBIBYTE:.1f} MiB, more than the limit of "
                          f"{max_bytes / MEBIBYTE:.1f} MiB: upload a smaller file")
    if not data:
        raise UploadError(f"the {what} is an empty file: upload a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            pixels = image.width * image.height
            if pixels <= max_pixels:
                image.load()
    except UNREADABLE as e:
        raise UploadError(f"the {what} is not an image that can be read ({type(e).__name__}): upload a PNG, "
                          "JPEG or WebP image") from None
    if pixels > max_pixels:
        raise UploadError(f"the {what} is {image.width}×{image.height} pixels, more than the limit of "
                          f"{max_pixels} pixels: upload a smaller image")
    return image


def content_name(data: bytes, prefix: str) -> str:
    """A file name for an upload from its bytes alone (``init-<sha256>.png``), never from the browser's name."""
    return f"{prefix}-{hashlib.sha256(data).hexdigest()[:HASH_CHARS]}.png"
