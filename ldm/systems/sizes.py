"""SDXL's micro-conditioning of a training batch, and CFG dropout of a conditioner's named outputs.

``batch_sizes`` is the one rule for the sizes a batch conditions on, in pixels:

- ``target_size`` (h, w): the latents' spatial size × the VAE's downsampling factor (the size the U-Net draws);
- ``original_size`` (h, w) and ``crop_top_left`` (top, left): what a bucketed cache records per image (its items carry
  them as (2,) tensors, (B, 2) after collation). A cache without them (a square, non-bucketed one) is taken as
  uncropped images at the target size: original = target, crop (0, 0) — SDXL's default at sampling time.

``drop_outputs`` is CFG dropout for a conditioner that returns several outputs (``{"context", "y"}``): one draw per
sample swaps *all* its outputs for the unconditional ones together. For SDXL's conditioner the unconditional outputs
are zeros for every text part and the same sizes (``SDXLConditioner.unconditional_conditioning``), which is what
generative-models' ``GeneralConditioner`` gives a dropped text embedding (it multiplies it by a Bernoulli mask and
never drops the size embedders); it draws one mask per text output, so its towers drop independently, where here a
dropped sample loses its whole caption at once (as diffusers' and kohya's SDXL scripts drop a caption).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ldm.nets.conditioning.sdxl import NUMBERS_PER_FIELD

LATENT_FIELDS = ("latent", "mean")  # where a batch carries its latents (B, C, h, w); "image" is in pixels already


def _sized_field(batch: Mapping) -> tuple[Tensor, int]:
    """The batch's latents (B, C, h, w) and pixels per cell (the VAE factor), or its images (B, 3, H, W) and 1."""
    for key in LATENT_FIELDS:
        if key in batch:
            return batch[key], 0
    if "image" in batch:
        return batch["image"], 1
    raise KeyError(f"the batch holds no latents ({', '.join(LATENT_FIELDS)}) nor images to size")


def target_size(batch: Mapping, factor: int) -> tuple[int, int]:
    """The pixel size (h, w) a batch trains at: its latents' (h, w) × the VAE factor, or its images' own size."""
    field, scale = _sized_field(batch)
    h, w = field.shape[-2:]
    return int(h) * (scale or factor), int(w) * (scale or factor)


def _rows(value: object, n: int, name: str) -> Tensor:
    """A batch's size field as (n, 2) float32."""
    rows = torch.as_tensor(value, dtype=torch.float32)
    if rows.shape != (n, NUMBERS_PER_FIELD):
        raise ValueError(f"the batch's {name} must be ({n}, {NUMBERS_PER_FIELD}), got {tuple(rows.shape)}")
    return rows


def batch_sizes(batch: Mapping, factor: int) -> dict[str, Tensor]:
    """``{original_size, crop_top_left, target_size: (B, 2)}`` in pixels for a batch of B latents or images (module
    docstring)."""
    n = len(_sized_field(batch)[0])
    target = torch.tensor([target_size(batch, factor)] * n, dtype=torch.float32)  # (B, 2)
    original = _rows(batch["original_size"], n, "original_size") if "original_size" in batch else target.clone()
    crop = (_rows(batch["crop_top_left"], n, "crop_top_left") if "crop_top_left" in batch
            else torch.zeros(n, NUMBERS_PER_FIELD))
    return {"original_size": original, "crop_top_left": crop, "target_size": target}


def drop_outputs(cond: Mapping[str, Tensor], null: Mapping[str, Tensor], rate: float) -> dict[str, Tensor]:
    """Each sample's outputs all swapped for ``null``'s with probability ``rate`` (one draw per sample)."""
    first = next(iter(cond.values()))
    n = first.shape[0]
    drop = torch.rand(n) < rate  # (B,) True = unconditional
    out = {}
    for name, value in cond.items():
        mask = drop.to(value.device).view(n, *([1] * (value.ndim - 1)))  # (B, 1, ...)
        out[name] = torch.where(mask, null[name].to(value), value)
    return out
