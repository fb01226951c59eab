"""Image tensors ↔ PIL images and grids (tensors in [-1, 1] unless stated)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from ldm.core.atomic import write_atomic

GRID_PADDING = 2


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) in [-1, 1] → uint8 array (…, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] → list of RGB (or L) PIL images."""
    arrays = to_uint8(x if x.dim() == 4 else x[None])
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float tensor in [-1, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def image_grid(rows: Sequence[torch.Tensor], ncol: int | None = None) -> Image.Image:
    """Stack rows of (B, C, H, W) tensors in [-1, 1] (e.g. inputs above reconstructions) into one image."""
    rows = [r.detach().float().cpu() for r in rows]
    rows = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows]
    ncol = ncol or rows[0].shape[0]
    grid = make_grid(torch.cat(rows), nrow=ncol, padding=GRID_PADDING, pad_value=1.0, value_range=(-1, 1), normalize=True)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Save a PIL image atomically (``ldm.core.atomic``), so a kill never leaves half a PNG."""
    path = Path(path)
    fmt = save_kwargs.pop("format", None) or path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    return write_atomic(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))
