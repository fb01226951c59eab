"""Image files as the folder dataset reads them: a cheap readability probe, any PIL mode to 8-bit RGB, decoding at a
reduced scale with the EXIF orientation applied, and the resize → crop → mirror that an image and its hint share."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_SCALE = 257.0  # 65535 / 255
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def probe_image(path: Path, min_size: int, max_pixels: int) -> str | None:
    """Cheap readability check (header + verify, no decode) → reason to skip, or None if fine."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return f"{width}x{height} exceeds max_pixels={max_pixels}"
                if min(width, height) < min_size:
                    return f"{width}x{height} is smaller than min_size={min_size}"
                image.verify()
    except Image.DecompressionBombError:
        return "decompression bomb"
    except Image.UnidentifiedImageError:
        return "not an image"
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
        return f"unreadable ({type(e).__name__})"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: alpha composited on white, 16-bit scaled (not clipped), CMYK/L/P converted."""
    image.load()
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        array = np.asarray(image).astype(np.float64)
        scale = 1.0 if mode == "I" and array.max(initial=0) <= 255 else SIXTEEN_BIT_SCALE
        return Image.fromarray((array / scale).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = array * 255 if array.max(initial=0) <= 1.0 else array
        return Image.fromarray(array.round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def open_rgb(path: Path | str, draft: int) -> Image.Image:
    """Decode an image (a JPEG at a reduced scale still ≥ ``draft`` pixels), upright by its EXIF, as 8-bit RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.draft(None, (draft, draft))
            return to_rgb(ImageOps.exif_transpose(image))


def fit(image: Image.Image, resized: tuple[int, int], box: tuple[int, ...], flip: bool, resample: int) -> Image.Image:
    """Resize to ``resized`` (w, h), crop ``box``, optionally mirror: the same for an image and its hint."""
    image = image.resize(resized, resample=resample).crop(box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
