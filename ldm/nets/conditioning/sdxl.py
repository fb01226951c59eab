"""SDXL's conditioner: two CLIP text towers → the cross-attention ``context``; pooled text + sizes → the ADM ``y``.

Semantics of generative-models' ``GeneralConditioner`` with SDXL base's embedders, in its state-dict names
(``embedders.0`` CLIP ViT-L/14 text, ``embedders.1`` OpenCLIP ViT-bigG/14 text): each tower gives its
penultimate block's tokens without ``ln_final``, concatenated along channels (768 + 1280 = 2048); the last tower
also gives its pooled, projected text embedding (1280). The ADM vector ``y`` is that pooled embedding followed by
sinusoidal (``ConcatTimestepEmbedderND``) embeddings, 256 wide per number, of the original size (h, w), the crop's
top-left corner (top, left) and the target size (h, w): 1280 + 6 × 256 = 2816. The outputs go to the U-Net by
name (``{"context": …, "y": …}``), never by their rank. The unconditional branch is zeros for every text output
with the same sizes (generative-models' ``force_uc_zero_embeddings=["txt"]``, diffusers'
``force_zeros_for_empty_prompt``), unless ``zero_unconditional: false`` (then: empty captions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ldm.nets.conditioning.base import Embedder
from ldm.nets.conditioning.openclip import FrozenOpenCLIP
from ldm.nets.unet.blocks import timestep_embedding

SIZE_EMBED_DIM = 256  # sinusoidal width per size number (SDXL's addition_time_embed_dim)
SIZE_FIELDS = ("original_size", "crop_top_left", "target_size")  # the order they take in y
NUMBERS_PER_FIELD = 2  # (h, w) or (top, left)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one request, in pixels: original size (h, w), crop top-left (top, left),
    target size (h, w). ``for_size(h, w)`` is the default: original = target = the requested size, no crop."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @classmethod
    def for_size(cls, height: int, width: int, original_size: Sequence[int] | None = None,
                 crop_top_left: Sequence[int] | None = None,
                 target_size: Sequence[int] | None = None) -> SizeConditioning:
        """The sizes of an image of height × width: each field given, or the default (the size itself; crop 0, 0)."""
        fields = {"original_size": original_size or (height, width), "crop_top_left": crop_top_left or (0, 0),
                  "target_size": target_size or (height, width)}
        for name, value in fields.items():
            if len(value) != NUMBERS_PER_FIELD or any(int(v) != v or v < 0 for v in value):
                raise ValueError(f"{name} must be two non-negative integers, got {list(value)}")
        return cls(**{name: (int(value[0]), int(value[1])) for name, value in fields.items()})

    def batch(self, n: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """The sizes as ``n`` rows per field: ``{field: (n, 2)}`` (the form a bucketed training batch carries)."""
        return {name: torch.tensor([getattr(self, name)] * n, dtype=torch.float32, device=device)
                for name in SIZE_FIELDS}


def size_embedding(sizes: Mapping[str, Tensor], dim: int = SIZE_EMBED_DIM) -> Tensor:
    """``{field: (B, 2)}`` → (B, 6·dim): each number's sinusoidal embedding, in ``SIZE_FIELDS`` order."""
    missing = [name for name in SIZE_FIELDS if name not in sizes]
    if missing:
        raise ValueError(f"size conditioning lacks {', '.join(missing)} (needs {', '.join(SIZE_FIELDS)})")
    rows = []
    for name in SIZE_FIELDS:
        values = torch.as_tensor(sizes[name])
        if values.ndim != 2 or values.shape[1] != NUMBERS_PER_FIELD:
            raise ValueError(f"{name} must be (B, {NUMBERS_PER_FIELD}), got shape {tuple(values.shape)}")
        emb = timestep_embedding(values.reshape(-1), dim)  # (2B, dim), [cos | sin]
        rows.append(emb.reshape(values.shape[0], NUMBERS_PER_FIELD * dim))  # (B, 2·dim)
    return torch.cat(rows, dim=1)  # (B, 6·dim)


class SDXLConditioner(Embedder):
    """Captions + sizes → ``{"context": (B, L, Σ widths), "y": (B, pooled + 6·size_embed_dim)}`` (``conditioning``;
    module docstring); ``forward`` gives the context alone (the ``Embedder`` contract).

    ``embedders``: the text towers, in the file's order (``embedders.N``); the last gives the pooled embedding.
    """

    takes_sizes = True

    def __init__(self, embedders: Sequence[FrozenOpenCLIP], size_embed_dim: int = SIZE_EMBED_DIM,
                 zero_unconditional: bool = True, key: str = "caption"):
        super().__init__()
        if not embedders:
            raise ValueError("SDXLConditioner needs at least one text embedder")
        lengths = {e.max_length for e in embedders}
        if len(lengths) != 1:
            raise ValueError(f"the text embedders' max_length differ ({sorted(lengths)}): their tokens are "
                             "concatenated")
        self.embedders = nn.ModuleList(embedders)
        self.key = key
        self.context_dim = sum(e.context_dim for e in embedders)
        self.size_embed_dim = size_embed_dim
        self.zero_unconditional = zero_unconditional
        pooled = embedders[-1].model.text_projection.shape[-1]
        self.adm_dim = pooled + len(SIZE_FIELDS) * NUMBERS_PER_FIELD * size_embed_dim

    def null_condition(self, n: int) -> list[str]:
        """``n`` empty captions."""
        return [""] * n

    def forward(self, captions: Sequence[str]) -> Tensor:
        """Captions → the cross-attention context alone ``(B, L, context_dim)``; the U-Net's inputs (with ``y``)
        come from ``conditioning``."""
        return torch.cat([e(list(captions)) for e in self.embedders], dim=-1)  # (B, L, Σ W)

    def conditioning(self, captions: Sequence[str], sizes: Mapping[str, Tensor] | SizeConditioning | None = None
                     ) -> dict[str, Tensor]:
        """``{"context": (B, L, context_dim), "y": (B, adm_dim)}`` for captions and their sizes (one
        ``SizeConditioning`` for all, or ``{field: (B, 2)}`` per sample)."""
        text = self.text_outputs(captions)
        return {"context": text["context"], "y": self._vector(text["pooled"], sizes)}

    def text_outputs(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """What the towers give for captions, before the sizes join: ``{"context": (B, L, context_dim), "pooled":
        (B, P)}`` (what a text-embedding cache stores)."""
        captions = list(captions)
        contexts = [e(captions) for e in self.embedders[:-1]]  # (B, L, W_i)
        last, pooled = self.embedders[-1].encode_pooled(captions)  # (B, L, W), (B, P)
        return {"context": torch.cat([*contexts, last], dim=-1), "pooled": pooled}  # (B, L, Σ W), (B, P)

    def unconditional_conditioning(self, n: int, sizes: Mapping[str, Tensor] | SizeConditioning | None = None
                                   ) -> dict[str, Tensor]:
        """The unconditional branch for ``n`` samples: zeroed text outputs with the same sizes (or empty captions)."""
        if not self.zero_unconditional:
            return self.conditioning(self.null_condition(n), sizes)
        device = self.device
        pooled = torch.zeros(n, self.embedders[-1].model.text_projection.shape[-1], device=device)  # (n, P)
        context = torch.zeros(n, self.embedders[0].max_length, self.context_dim, device=device)  # (n, L, D)
        return {"context": context, "y": self._vector(pooled, sizes)}

    def _vector(self, pooled: Tensor, sizes: Mapping[str, Tensor] | SizeConditioning | None) -> Tensor:
        """The ADM vector: pooled text (B, P) ++ size embeddings (B, 6·dim)."""
        return adm_vector(pooled, sizes, self.size_embed_dim)


def adm_vector(pooled: Tensor, sizes: Mapping[str, Tensor] | SizeConditioning | None,
               size_embed_dim: int = SIZE_EMBED_DIM) -> Tensor:
    """SDXL's ADM vector ``y``: pooled text (B, P) ++ the size embeddings (B, 6·size_embed_dim)."""
    if sizes is None:
        raise ValueError("SDXL needs its size conditioning (original size, crop top-left, target size): pass "
                         "SizeConditioning.for_size(height, width)")
    if isinstance(sizes, SizeConditioning):
        sizes = sizes.batch(pooled.shape[0])
    emb = size_embedding({k: torch.as_tensor(v).to(pooled.device) for k, v in sizes.items()}, size_embed_dim)
    if emb.shape[0] != pooled.shape[0]:
        raise ValueError(f"{emb.shape[0]} size rows for {pooled.shape[0]} captions")
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)  # (B, adm_dim)
