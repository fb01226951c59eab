"""The interface every conditioning embedder shares, and classifier-free-guidance (CFG) dropout.

An embedder turns a batch field (``key``: ``"caption"`` or ``"label"``) into a cross-attention context
``(B, T, context_dim)``; ``conditioning(cond)`` names what goes to the network (``{"context": …}``; SDXL's
conditioner adds the ADM vector ``"y"``, from ``SizeConditioning``). ``null_condition(n)`` gives the raw
unconditional input (empty captions or the
null class); ``ucg_dropout`` swaps a random share of a batch's conditions for it during training, as
latent-diffusion's ``ucg_rate`` / generative-models' ``GeneralConditioner`` do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence, Union

import torch
from torch import nn

# A raw condition batch: captions (list of str) or class labels (LongTensor (B,)).
Condition = Union[list[str], torch.Tensor]


class Embedder(nn.Module, ABC):
    """Base class: ``key`` (batch field), ``context_dim``, ``forward(cond) -> (B, T, D)``, ``null_condition(n)``."""

    key: str
    context_dim: int

    @abstractmethod
    def null_condition(self, n: int) -> Condition:
        """The raw unconditional input for ``n`` samples."""

    def unconditional(self, n: int) -> torch.Tensor:
        """The unconditional context for ``n`` samples, ``(n, T, D)``."""
        return self(self.null_condition(n))

    takes_sizes = False  # whether ``conditioning`` reads image sizes (SDXL's micro-conditioning)

    def conditioning(self, cond: Condition, sizes: Any = None) -> dict[str, torch.Tensor]:
        """The network's inputs by name: ``{"context": (B, T, D)}``; ``sizes`` only for embedders that take them."""
        if sizes is not None:
            raise ValueError(f"{type(self).__name__} takes no size conditioning (original size, crop, target size)")
        return {"context": self(cond)}

    def unconditional_conditioning(self, n: int, sizes: Any = None) -> dict[str, torch.Tensor]:
        """``conditioning`` of the unconditional input for ``n`` samples."""
        return self.conditioning(self.null_condition(n), sizes)

    @property
    def device(self) -> torch.device:
        """The device of the module's weights (CPU for a module without any)."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")


def ucg_dropout(
    cond: Condition | Sequence[str],
    null: Condition | Sequence[str] | str | int,
    rate: float,
    generator: torch.Generator | None = None,
) -> Condition:
    """Replace each sample's condition by the null one with probability ``rate`` (drawn anew per call).

    ``cond`` is a list of captions or a tensor of labels ``(B, ...)``; ``null`` is the matching
    unconditional input (``embedder.null_condition(B)``, or a single caption / label for all).
    ``rate`` 0 returns ``cond`` unchanged; 1 returns all null. Pass a seeded ``generator`` to reproduce.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"ucg_dropout: rate must be in [0, 1], got {rate}")
    n = len(cond)
    if rate == 0.0 or n == 0:
        return cond
    device = generator.device if generator is not None else torch.device("cpu")
    drop = torch.rand(n, generator=generator, device=device) < rate  # (B,) True = unconditional

    if isinstance(cond, torch.Tensor):
        null_t = torch.as_tensor(null, dtype=cond.dtype, device=cond.device)
        if null_t.ndim == 0:
            null_t = null_t.expand_as(cond)
        if null_t.shape != cond.shape:
            raise ValueError(f"ucg_dropout: null shape {tuple(null_t.shape)} != condition shape {tuple(cond.shape)}")
        mask = drop.to(cond.device).view(n, *([1] * (cond.ndim - 1)))  # (B, 1, ...)
        return torch.where(mask, null_t, cond)

    nulls = [null] * n if isinstance(null, str) else list(null)
    if len(nulls) != n:
        raise ValueError(f"ucg_dropout: {len(nulls)} null conditions for a batch of {n}")
    return [u if d else c for c, u, d in zip(cond, nulls, drop.tolist())]
