"""The pictures of image-to-image and inpainting: an init image and a mask (paths, PIL images or tensors) → pixels.

The init image is converted to RGB and resized to the output size (BOX when shrinking, Lanczos when enlarging, as
control images are); a mask (white = repaint, black = keep; any mode, read as luminance) must have the init image's
size and is resized with it, then binarised at one half (diffusers' mask processor). Tensors are (3, H, W) or
(N, 3, H, W) in [0, 1] for images and (H, W), (1, H, W) or (N, 1, H, W) in [0, 1] for masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ldm.core.images import from_pil
from ldm.inference.loaders import PipelineError

ImageInput = str | os.PathLike | Image.Image | Tensor
MASK_THRESHOLD = 0.5  # mask pixels at or above it are repainted
RGB_CHANNELS = 3


class EditImageError(PipelineError):
    """An init image or mask that cannot be read or does not fit."""


@dataclass(frozen=True)
class EditImages:
    """Prepared editing inputs: the init image (1 or N, 3, H, W) in [-1, 1] and the mask (1 or N, 1, H, W) in {0, 1}."""

    image: Tensor
    mask: Tensor | None = None  # 1 = repaint

    def part(self, start: int, end: int) -> EditImages:
        """The inputs of images start..end (one shared image or mask stays shared)."""
        image = self.image if len(self.image) == 1 else self.image[start:end]
        mask = self.mask if self.mask is None or len(self.mask) == 1 else self.mask[start:end]
        return replace(self, image=image, mask=mask)


def _open(value: ImageInput, name: str, mode: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert(mode)
    try:
        with Image.open(value) as opened:
            return opened.convert(mode)
    except (OSError, UnidentifiedImageError) as e:
        raise EditImageError(f"cannot read {name} {value}: {getattr(e, 'strerror', None) or e}") from e


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
    if image.size == (width, height):
        return image
    shrink = width * height < image.width * image.height
    return image.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)


def image_size(value: ImageInput, name: str = "the init image") -> tuple[int, int]:
    """(height, width) of an image input."""
    if isinstance(value, Tensor):
        return tuple(value.shape[-2:])
    if isinstance(value, Image.Image):
        return value.height, value.width
    try:
        with Image.open(value) as opened:
            return opened.height, opened.width
    except (OSError, UnidentifiedImageError) as e:
        raise EditImageError(f"cannot read {name} {value}: {getattr(e, 'strerror', None) or e}") from e


def init_pixels(value: ImageInput, height: int, width: int, name: str = "the init image") -> Tensor:
    """An init image → (1 or N, 3, height, width) in [-1, 1]."""
    if isinstance(value, Tensor):
        pixels = value[None] if value.ndim == RGB_CHANNELS else value  # (N, 3, H, W) in [0, 1]
        if pixels.ndim != 4 or pixels.shape[1] != RGB_CHANNELS:
            raise EditImageError(f"{name} tensor must be (3, H, W) or (N, 3, H, W), got {tuple(value.shape)}")
        pixels = F.interpolate(pixels.detach().float().cpu(), size=(height, width), mode="bilinear",
                               antialias=True, align_corners=False) if pixels.shape[-2:] != (height, width) else pixels
        return (pixels.clamp(0, 1) * 2 - 1).float().cpu()
    return from_pil(_resize(_open(value, name, "RGB"), height, width))[None]  # (1, 3, H, W)


def mask_pixels(value: ImageInput, height: int, width: int, name: str = "the mask") -> Tensor:
    """A mask → (1 or N, 1, height, width) in {0, 1}, 1 = repaint."""
    if isinstance(value, Tensor):
        mask = value.detach().float().cpu()
        mask = mask.reshape(1, 1, *mask.shape[-2:]) if mask.ndim in (2, 3) else mask  # (N, 1, H, W)
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise EditImageError(f"{name} tensor must be (H, W), (1, H, W) or (N, 1, H, W), got {tuple(value.shape)}")
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    else:
        grey = _resize(_open(value, name, "L"), height, width)
        mask = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().div(255)
        mask = mask.reshape(1, 1, height, width)
    return (mask >= MASK_THRESHOLD).float()


def prepare_edit(init: ImageInput, mask: ImageInput | None, n: int, height: int, width: int,
                 init_name: str = "the init image", mask_name: str = "the mask") -> EditImages:
    """The init image and mask at the output size (``ldm.inference.request.check_edit`` checked they fit)."""
    image = init_pixels(init, height, width, init_name)
    masks = None if mask is None else mask_pixels(mask, height, width, mask_name)
    for what, tensor in ((init_name, image), (mask_name, masks)):
        if tensor is not None and len(tensor) not in (1, n):
            raise EditImageError(f"{len(tensor)} of {what} for {n} images: give one, or one per image")
    return EditImages(image, masks)
