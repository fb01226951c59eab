"""What every system trained on the latent cache shares: latents drawn from the cached posteriors, and the cache's
measured scale factor and image size."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor


def cached_latents(batch: dict, scale_factor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z·scale_factor with z = mean + std·ε drawn from a batch's cached posterior (B, C, h, w)."""
    mean, std = batch["mean"], batch["std"]  # (B, C, h, w)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale_factor


def cache_meta(trainer: L.Trainer | None) -> dict:
    """The ``meta.json`` of the latent cache the trainer's data module reads (empty when it reads none)."""
    datamodule = getattr(trainer, "datamodule", None)
    return getattr(getattr(datamodule, "train_dataset", None), "meta", None) or {}


def adopt_cache_scale(scale_factor: Tensor, image_size: Tensor | None, meta: dict) -> None:
    """Fill an unset (NaN) scale factor, and an unset (0) image size, from the cache; a scale still unknown is an error."""
    if math.isnan(float(scale_factor)) and "scale_factor" in meta:
        scale_factor.fill_(meta["scale_factor"])
    if image_size is not None and not int(image_size) and meta.get("image_size"):
        image_size.fill_(int(meta["image_size"][-1]))
    if math.isnan(float(scale_factor)):
        raise ValueError("scale_factor is unknown: train on a latent cache (which measures it) or set it in the config")
