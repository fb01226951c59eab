"""CachedSDXLConditioner: stands in for SDXL's frozen conditioner (``ldm.nets.conditioning.sdxl.SDXLConditioner``)
when a latent cache holds, per caption, both of its text outputs: the context of the two towers and the last tower's
pooled projection.

A batch of such a cache carries them under ``key`` (``"text"``): ``{"context": (B, L, D), "pooled": (B, P)}``.
``conditioning(batch["text"], sizes)`` gives the U-Net's inputs by name, ``{"context": (B, L, D), "y": (B, adm)}``,
with ``y`` made by the conditioner's own rule (``sdxl.adm_vector``: pooled ++ Fourier embeddings of the sizes);
``unconditional_conditioning(n, sizes)`` gives the unconditional branch: zeros for both text outputs with the same
sizes (SDXL's ``zero_unconditional``), or the cached empty caption's outputs. Captions (a sample grid, sampling) go
through the real conditioner, built on first use from the weights the stand-in keeps for state dicts
(``FrozenWeights``), so a checkpoint holds ``cond_stage_model.embedders.*`` as a run with the real conditioner would.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ldm.nets.conditioning.cached import FrozenWeights
from ldm.nets.conditioning.sdxl import SIZE_EMBED_DIM, SizeConditioning, adm_vector

CACHED_TEXT_KEY = "text"  # the batch field holding {"context", "pooled"}
Sizes = Mapping[str, Tensor] | SizeConditioning | None


class CachedSDXLConditioner(FrozenWeights):
    """Cached ``{"context", "pooled"}`` + sizes → ``{"context", "y"}`` as ``SDXLConditioner.conditioning`` gives them.

    ``uncond``: the cached outputs for ``""``, ``{"context": (1, L, D), "pooled": (1, P)}``; ``weights`` /
    ``build_encoder``: the real conditioner's state dict and its maker (``FrozenWeights``); ``size_embed_dim`` and
    ``zero_unconditional``: the real conditioner's settings.
    """

    takes_sizes = True

    def __init__(self, weights: dict[str, Tensor], uncond: Mapping[str, Tensor], build_encoder: Callable[[], nn.Module],
                 size_embed_dim: int = SIZE_EMBED_DIM, zero_unconditional: bool = True, key: str = CACHED_TEXT_KEY):
        super().__init__(weights, build_encoder)
        context, pooled = uncond["context"], uncond["pooled"]
        if context.ndim != 3 or context.shape[0] != 1 or pooled.ndim != 2 or pooled.shape[0] != 1:
            raise ValueError(f"uncond must hold context (1, L, D) and pooled (1, P), got {tuple(context.shape)} and "
                             f"{tuple(pooled.shape)}")
        self.key, self.context_dim = key, context.shape[-1]
        self.size_embed_dim, self.zero_unconditional = size_embed_dim, zero_unconditional
        self.adm_dim = adm_vector(torch.zeros_like(pooled), SizeConditioning.for_size(1, 1), size_embed_dim).shape[1]
        self.register_buffer("uncond_context", context.float(), persistent=False)  # (1, L, D)
        self.register_buffer("uncond_pooled", pooled.float(), persistent=False)  # (1, P)

    def forward(self, captions: Sequence[str]) -> Tensor:
        """Captions → the context alone ``(B, L, D)`` through the real conditioner (the ``Embedder`` contract)."""
        if isinstance(captions, Mapping):
            raise TypeError("cached SDXL text outputs make the U-Net's inputs with their sizes: call "
                            "conditioning(batch['text'], sizes), not the conditioner itself")
        with torch.no_grad():
            return self.encoder()(list(captions))

    def conditioning(self, cond: Mapping[str, Tensor] | Sequence[str], sizes: Sizes = None) -> dict[str, Tensor]:
        """``{"context": (B, L, D), "y": (B, adm_dim)}`` from a batch's cached ``{"context", "pooled"}``, or from
        captions through the real conditioner; ``sizes``: one ``SizeConditioning`` or ``{field: (B, 2)}``."""
        if not isinstance(cond, Mapping):
            with torch.no_grad():
                return self.encoder().conditioning(list(cond), sizes)
        context, pooled = cond["context"], cond["pooled"]  # (B, L, D), (B, P)
        return {"context": context, "y": adm_vector(pooled, sizes, self.size_embed_dim)}

    def unconditional(self, n: int) -> Tensor:
        """The unconditional context for ``n`` samples ``(n, L, D)``: zeros, or the cached empty caption's."""
        return self._unconditional_text(n)["context"]

    def unconditional_conditioning(self, n: int, sizes: Sizes = None) -> dict[str, Tensor]:
        """The unconditional branch for ``n`` samples with these sizes (zeroed or empty-caption text outputs)."""
        return self.conditioning(self._unconditional_text(n), sizes)

    def _unconditional_text(self, n: int) -> dict[str, Tensor]:
        context, pooled = self.uncond_context.expand(n, -1, -1), self.uncond_pooled.expand(n, -1)  # (n, L, D), (n, P)
        if self.zero_unconditional:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        return {"context": context, "pooled": pooled}
