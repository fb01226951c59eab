"""The page's form → a checked PageRequest: numbers in range, seed drawn when asked, uploads decoded, LoRA chosen.

Numbers get the command line's one-line messages; the server's own limits (steps, pixels per side, images per
request, upload size) are set when it starts. A LoRA is chosen by its name in the server's LoRA folder listing,
so nothing the browser sends is ever joined onto a path.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from safetensors import SafetensorError, safe_open

from ldm.core.errors import UserError
from ldm.serve.adapter import ModelInfo, PageRequest
from ldm.serve.uploads import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB, MEBIBYTE, content_name, read_image

SEED_RANGE = 2**31  # a random seed is drawn below this, as txt2img.py draws one
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LORA_KEY_MARK = "lora"
UPLOAD_FIELDS = {"control": "control image", "init": "init image", "mask": "mask"}


class FormError(UserError, ValueError):
    """A form field with a value the server cannot use."""


@dataclass(frozen=True)
class Limits:
    """What the server accepts, beyond what the model can draw (set by serve.py's flags)."""

    max_steps: int = 150
    max_side: int = 2048  # pixels per side of a generated image
    max_images: int = 8  # images per request
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MEBIBYTE)
    max_pixels: int = DEFAULT_MAX_PIXELS  # of an uploaded image

    def max_body_bytes(self) -> int:
        """The largest request body worth reading: every upload at its limit, plus the text fields."""
        return len(UPLOAD_FIELDS) * self.max_upload_bytes + MEBIBYTE


def looks_like_lora(path: Path) -> bool:
    """A .safetensors file with a LoRA tensor in its header (every layout's keys say ``lora``: kohya's ``lora_unet_``,
    peft's ``lora_A``, diffusers' ``lora.down``), so that a model file beside the LoRAs is left out; a pickle cannot
    be read cheaply, so it is offered and checked when chosen."""
    if path.suffix != ".safetensors":
        return True
    try:
        with safe_open(str(path), "pt") as f:
            return any(LORA_KEY_MARK in key.lower() for key in f.keys())
    except (OSError, SafetensorError):
        return False


def lora_files(folder: str | Path | None) -> dict[str, Path]:
    """The LoRA files the page offers: name → path, for the LoRA files directly in ``folder``."""
    if folder is None:
        return {}
    if not Path(folder).is_dir():
        raise FormError(f"--lora-dir {folder} is not a folder: give the folder that holds your LoRA files")
    return {p.name: p for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.suffix in LORA_SUFFIXES and looks_like_lora(p)}


def _number(fields: Mapping[str, str], name: str, kind: type, default=None):
    text = (fields.get(name) or "").strip()
    if not text:
        if default is None:
            raise FormError(f"{name} is missing: give a number")
        return default
    try:
        value = kind(text)
    except ValueError:
        whole = "a whole number" if kind is int else "a number"
        raise FormError(f"{name} must be {whole}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise FormError(f"{name} must be a finite number, got {text!r}")
    return value


def _in_range(name: str, value, low, high=None) -> None:
    if value < low:
        raise FormError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise FormError(f"{name} must be at most {high} on this server, got {value}")


def _seed(fields: Mapping[str, str]) -> int:
    """The form's seed, or a random one when "random" is ticked or the seed is empty."""
    if fields.get("random_seed") in ("on", "true", "1") or not (fields.get("seed") or "").strip():
        return secrets.randbelow(SEED_RANGE)
    seed = _number(fields, "seed", int)
    _in_range("seed", seed, 0, SEED_RANGE * 2 - 1)
    return seed


def _size(fields: Mapping[str, str], name: str, default: int | None, limits: Limits) -> int | None:
    """A side in pixels within the server's limit (``default`` when empty: None lets the request decide)."""
    if not (fields.get(name) or "").strip() and default is None:
        return None
    side = _number(fields, name, int, default)
    _in_range(name, side, 1, limits.max_side)
    return side


def _uploads(files: Mapping[str, bytes], limits: Limits) -> dict[str, tuple[Image.Image, bytes]]:
    """The non-empty uploads, decoded (UploadError on a bad one)."""
    return {name: (read_image(data, UPLOAD_FIELDS[name], limits.max_upload_bytes, limits.max_pixels), data)
            for name, data in files.items() if name in UPLOAD_FIELDS and data}


def parse_form(fields: Mapping[str, str], files: Mapping[str, bytes], info: ModelInfo, limits: Limits,
               loras: Mapping[str, Path]) -> tuple[PageRequest, dict[str, tuple[str, bytes]]]:
    """A PageRequest from the form's text fields and uploaded bytes, and the uploads to keep (field → (content
    name, bytes)); the request's own rules (strength, a mask with its init image) are ``check_request``'s."""
    steps = _number(fields, "steps", int, info.defaults["steps"])
    _in_range("steps", steps, 1, limits.max_steps)
    guidance = _number(fields, "guidance", float, info.defaults["guidance"])
    _in_range("guidance", guidance, 0)
    n = _number(fields, "n", int, 1)
    _in_range("number of images", n, 1, limits.max_images)
    uploads = _uploads(files, limits)
    default_side = None if "init" in uploads else info.image_size  # from an init image: its size, as txt2img.py
    height, width = _size(fields, "height", default_side, limits), _size(fields, "width", default_side, limits)
    control_scale = _number(fields, "control_scale", float, info.defaults["control_scale"])
    _in_range("control scale", control_scale, 0)
    strength = _number(fields, "strength", float) if (fields.get("strength") or "").strip() else None
    lora_scale = _number(fields, "lora_scale", float, 1.0)
    lora_name = (fields.get("lora") or "").strip()
    if lora_name and lora_name not in loras:
        raise FormError(f"no LoRA named {lora_name!r} on this server: choose one of the list "
                        f"({', '.join(loras) or 'none offered'})")
    image = {name: uploads[name][0] if name in uploads else None for name in UPLOAD_FIELDS}
    kept = {name: (content_name(data, name), data) for name, (_, data) in uploads.items()}
    label = fields.get("class") if info.condition_key == "label" else None
    request = PageRequest(
        sampler=fields.get("sampler") or info.defaults["sampler"], steps=steps, guidance=guidance,
        seed=_seed(fields), height=height, width=width, n=n, prompt=fields.get("prompt") or "",
        negative=fields.get("negative_prompt") or None, label=label, control=image["control"],
        control_scale=control_scale, init=image["init"], mask=image["mask"], strength=strength,
        names={name: kept[name][0] for name in kept}, lora=loras[lora_name] if lora_name else None,
        lora_scale=lora_scale)
    return request, kept
