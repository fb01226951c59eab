"""The one optimiser vocabulary every system uses: AdamW with a linear warm-up, then constant or cosine decay.

    optimizer: {target: ldm.systems.optim.AdamW, params: {lr: 1.0e-3, warmup_steps: 200, decay: cosine}}
    optimizer: {target: ldm.systems.optim.AdamW, params: {lr: 1.0e-3, betas: [0.5, 0.9], decay: cosine}}  # the VAE
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")  # torch's fused Adam(W) kernels: ~3× faster steps than the per-tensor loop
LRDecay = Literal["constant", "cosine"]
LR_DECAYS = ("constant", "cosine")
DEFAULT_BETAS = (0.9, 0.999)  # torch's


def fused_supported(params: Sequence[nn.Parameter]) -> bool:
    """Whether torch's fused Adam(W) can step these parameters (floating point, on CPU or CUDA)."""
    return all(p.device.type in FUSED_OPTIMIZER_DEVICES and p.is_floating_point() for p in params)


def lr_factor(step: int, warmup: int = 0, total: int | None = None, decay: LRDecay = "constant") -> float:
    """The learning-rate multiplier at ``step``: (step + 1)/warmup during warm-up, then 1, or a cosine from 1
    at the end of warm-up to 0 at ``total`` steps (``total`` None: no decay)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr decay must be one of {', '.join(LR_DECAYS)}, got {decay!r}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "cosine" and total:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def total_steps(trainer) -> int | None:
    """The optimiser steps a fit will take (None when unbounded), for the cosine decay."""
    if trainer is None:
        return None
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) and total > 0 else None


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int | None,
                    decay: LRDecay) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR applying ``lr_factor``."""
    lr_factor(0, warmup, total, decay)  # reject a bad decay name now
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, decay))


@dataclass(frozen=True)
class AdamW:
    """AdamW (torch's fused kernel where it runs) with ``lr_factor``'s warm-up and decay, stepped per batch."""

    lr: float = 1e-4
    weight_decay: float = 0.0  # 0: Adam's update exactly
    warmup_steps: int = 0
    decay: LRDecay = "constant"
    betas: Sequence[float] = DEFAULT_BETAS

    def __post_init__(self) -> None:
        if self.decay not in LR_DECAYS:
            raise ValueError(f"decay must be one of {', '.join(LR_DECAYS)}, got {self.decay!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers (β1, β2), got {list(self.betas)}")

    def optimizer(self, params: list[nn.Parameter], lr: float | None = None) -> torch.optim.AdamW:
        """The optimiser over ``params`` (at ``lr`` when given, e.g. a discriminator's own rate)."""
        return torch.optim.AdamW(params, lr=self.lr if lr is None else lr, betas=tuple(self.betas),
                                 weight_decay=self.weight_decay, fused=fused_supported(params))

    def schedule(self, optimizer: torch.optim.Optimizer, total: int | None) -> torch.optim.lr_scheduler.LambdaLR:
        """Its warm-up and decay over a fit of ``total`` steps, stepped per batch."""
        return warmup_schedule(optimizer, self.warmup_steps, total, self.decay)

    def build(self, params: list[nn.Parameter], total: int | None) -> dict:
        """Lightning's ``configure_optimizers`` answer for ``params`` over a fit of ``total`` steps."""
        opt = self.optimizer(params)
        sched = self.schedule(opt, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
