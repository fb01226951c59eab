"""A fine-tune's system built from its base file, a batch of its latent cache, and one training step outside a Trainer
(what the SD, SDXL and LoRA fine-tune tests step by hand)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ldm.data.latents import LatentDataset
from ldm.inference.loaders import build_system
from ldm.training.cache import ensure_cache
from ldm.training.sd_finetune import start_from_base


def from_base(cfg: dict):
    """The completed config's system with its base file's weights, as a new run starts."""
    system = build_system(cfg["model"])
    start_from_base(system, cfg)
    return system


def cache_batch(cfg: dict, rows: Sequence[int] = range(4)) -> dict:
    """The cache's items ``rows`` collated (the cache built first when missing)."""
    ensure_cache(cfg)
    data = LatentDataset(cfg["cache"]["dir"], "train")
    return torch.utils.data.default_collate([data[i] for i in rows])


def loss_step(system, batch: dict, seed: int | None = 0) -> torch.Tensor:
    """One training loss (noise drawn from ``seed``; None: the current RNG) and its backward pass."""
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = system.training_step(batch, 0)
    loss.backward()
    return loss
