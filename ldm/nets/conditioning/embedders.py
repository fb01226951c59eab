"""Conditioning embedders: batch captions / labels → cross-attention context ``(B, T, D)``.

Every embedder has ``key`` (the batch field it reads), ``context_dim``, ``forward(cond)`` and
``null_condition(n)``; ``ucg_dropout`` applies classifier-free-guidance dropout to a batch's raw
conditions. ``ClassEmbedder`` lives here; the text encoders live in ``text.py`` / ``openclip.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.nets.conditioning.base import Condition, Embedder, ucg_dropout
from ldm.nets.conditioning.openclip import FrozenOpenCLIP
from ldm.nets.conditioning.openclip_weights import WeightsUnavailableError
from ldm.nets.conditioning.text import TextTransformer

NULL_ROWS = 1  # one extra embedding row: the null (unconditional) class


class ClassEmbedder(Embedder):
    """Class label → context ``(B, 1, embed_dim)``; index ``n_classes`` is the null class (as LDM's).

    ``class_names`` (label i is ``class_names[i]``, e.g. the class folders) are kept for sampling by name.
    """

    def __init__(self, n_classes: int, embed_dim: int, key: str = "label", class_names: list[str] | None = None):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {n_classes}")
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"class_names has {len(class_names)} names for n_classes={n_classes}")
        self.class_names = list(class_names) if class_names is not None else None
        self.key = key
        self.context_dim = embed_dim
        self.n_classes = n_classes
        self.null_class = n_classes
        self.embedding = nn.Embedding(n_classes + NULL_ROWS, embed_dim)

    def null_condition(self, n: int) -> torch.Tensor:
        """``n`` null-class labels, LongTensor ``(n,)``."""
        return torch.full((n,), self.null_class, dtype=torch.long, device=self.embedding.weight.device)

    def forward(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Labels ``(B,)`` in ``[0, n_classes]`` → context ``(B, 1, embed_dim)``."""
        labels = torch.as_tensor(labels, device=self.embedding.weight.device)
        if labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"class labels must be integers, got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"class labels must have shape (B,), got {tuple(labels.shape)}")
        bad = (labels < 0) | (labels > self.null_class)
        if bad.any():
            raise ValueError(
                f"class label(s) {labels[bad][:8].tolist()} out of range: expected 0..{self.n_classes - 1} "
                f"(n_classes={self.n_classes}) or {self.null_class} for the null class"
            )
        return self.embedding(labels.long())[:, None]  # (B, 1, D)


class UnconditionalEmbedder(ClassEmbedder):
    """An unconditional model's conditioning: class labels are read and checked (so samplers and classifier guidance
    can name them) but every one maps to the null class's learned context, so the U-Net never sees the class."""

    def forward(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Labels ``(B,)`` → the null context ``(B, 1, embed_dim)``."""
        checked = super().forward(labels)  # validates the labels
        return self.embedding.weight[self.null_class].expand_as(checked)


__all__ = [
    "ClassEmbedder",
    "Condition",
    "Embedder",
    "FrozenOpenCLIP",
    "TextTransformer",
    "UnconditionalEmbedder",
    "WeightsUnavailableError",
    "ucg_dropout",
]
