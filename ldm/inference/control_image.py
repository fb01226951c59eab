"""Control (hint) images for sampling with a ControlNet: paths, PIL images or tensors → (N, 3, H, W) in [0, 1].

Whatever its size and mode, a control image is converted to RGB and resized to the output size (BOX when
shrinking, Lanczos when enlarging), as ControlNet's ``resize_image`` prepares a hint; stored edge maps
(white on black, e.g. from scripts/make_edges.py) are used as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ldm.core.errors import UserError
from ldm.data.edges import edge_hint, hint_from_image

HINT_CHANNELS = 3  # ControlNet's RGB hints
DEFAULT_CONTROL_SCALE = 1.0
ControlInput = str | os.PathLike | Image.Image | Tensor


class ControlImageError(UserError, ValueError):
    """A control (hint) image that cannot be read or does not fit the requested size."""


def hint_from_pil(image: Image.Image, height: int, width: int) -> Tensor:
    """A PIL image of any mode and size → (3, height, width) in [0, 1]."""
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        shrink = width * height < rgb.width * rgb.height
        rgb = rgb.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    return hint_from_image(rgb)  # (3, H, W)


def hint_from_tensor(hint: Tensor, height: int, width: int) -> Tensor:
    """A (3, H, W) or (N, 3, H, W) tensor in [0, 1] → (N, 3, height, width), bilinearly resized when needed."""
    hint = hint[None] if hint.ndim == HINT_CHANNELS else hint  # (N, 3, H, W)
    if hint.ndim != 4 or hint.shape[1] != HINT_CHANNELS:
        raise ControlImageError(f"a control tensor must be (3, H, W) or (N, 3, H, W), got {tuple(hint.shape)}")
    hint = hint.detach().float().cpu()
    if hint.shape[-2:] != (height, width):
        hint = F.interpolate(hint, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return hint.clamp(0, 1)


def one_hint(control: ControlInput, height: int, width: int) -> Tensor:
    """One control input (path, PIL image or tensor) → (N, 3, height, width) in [0, 1] (N = 1 except for tensors)."""
    if isinstance(control, Tensor):
        return hint_from_tensor(control, height, width)
    if isinstance(control, Image.Image):
        return hint_from_pil(control, height, width)[None]
    if isinstance(control, (str, os.PathLike)):
        return load_control_image(control, height, width, multiple=1)  # (1, 3, H, W); the size is checked already
    raise ControlImageError(f"a control image must be a path, a PIL image or a tensor, not {type(control).__name__}")


def prepare_hints(control: ControlInput | Sequence[ControlInput], n: int, height: int, width: int) -> Tensor:
    """One control for every image, or one per image (a sequence or an (n, 3, H, W) tensor) → (1 or n, 3, H, W)."""
    items = list(control) if isinstance(control, (list, tuple)) else [control]
    if not items:
        raise ControlImageError("an empty list of control images")
    hints = torch.cat([one_hint(c, height, width) for c in items])  # (M, 3, H, W)
    if len(hints) not in (1, n):
        raise ControlImageError(f"{len(hints)} control images for {n} images: give one, or one per image")
    return hints


@dataclass(frozen=True)
class ControlSettings:
    """A prepared ControlNet request: hints (1 or N, 3, H, W) in [0, 1] on the CPU, their scale, guess mode."""

    hints: Tensor
    scale: float = DEFAULT_CONTROL_SCALE
    guess_mode: bool = False

    def part(self, start: int, end: int) -> ControlSettings:
        """The hints of images start..end (one shared hint stays shared)."""
        return self if len(self.hints) == 1 else replace(self, hints=self.hints[start:end])


def load_control_image(path: str | os.PathLike, height: int | None = None, width: int | None = None,
                       multiple: int = 8, canny: bool = False) -> Tensor:
    """A hint image as ControlNet takes it: (1, 3, H, W) in [0, 1] (white edges on black for Canny models).

    ``path`` is the hint itself (an edge map, e.g. from scripts/make_edges.py) or, with ``canny``, a photo
    whose Canny edges are taken (after resizing, as ControlNet's annotator does). It is resized to
    ``height`` × ``width`` when given, else cut down to a multiple of ``multiple`` (the VAE's factor).
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ControlImageError(f"cannot read the control image {path}: {e}") from e
    w, h = image.size
    height = height or h - h % multiple
    width = width or w - w % multiple
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ControlImageError(f"control image size {height}×{width} must be a positive multiple of {multiple}")
    if (width, height) != (w, h):
        shrink = width * height < w * h
        image = image.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    hint = edge_hint(image) if canny else hint_from_image(image)  # (3, H, W) in [0, 1]
    return hint[None]  # (1, 3, H, W)
