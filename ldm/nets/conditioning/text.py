"""TextTransformer: a small text encoder trained from scratch with the diffusion model.

latent-diffusion's BERT-style route (``BERTEmbedder`` / ``TransformerEmbedder``): token embedding +
learned positional embedding + a pre-LayerNorm transformer encoder + a final LayerNorm; the whole
token sequence is the cross-attention context. Captions are tokenised with open_clip's BPE vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.nets.conditioning.base import Embedder
from ldm.nets.conditioning.tokens import CaptionTokenizer

MLP_RATIO = 4
TOKEN_INIT_STD = 0.02  # as CLIP's text tower
POSITION_INIT_STD = 0.01


class TextTransformer(Embedder):
    """Trainable caption encoder: ``forward(captions) -> (B, max_length, embed_dim)``."""

    def __init__(
        self,
        embed_dim: int = 256,
        n_layers: int = 2,
        n_heads: int = 4,
        max_length: int = 77,
        vocab_size: int = 49408,
        key: str = "caption",
    ):
        super().__init__()
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by n_heads {n_heads}")
        self.tokenizer = CaptionTokenizer(max_length)
        if vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the tokenizer's vocabulary ({self.tokenizer.vocab_size})"
            )
        self.key = key
        self.context_dim = embed_dim
        self.max_length = max_length

        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.positional_embedding = nn.Parameter(torch.empty(max_length, embed_dim))
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            n_heads,
            dim_feedforward=MLP_RATIO * embed_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(embed_dim)
        nn.init.normal_(self.token_embedding.weight, std=TOKEN_INIT_STD)
        nn.init.normal_(self.positional_embedding, std=POSITION_INIT_STD)

    def null_condition(self, n: int) -> list[str]:
        """``n`` empty captions."""
        return [""] * n

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → context ``(B, max_length, embed_dim)``."""
        tokens = self.tokenizer(captions).to(self.token_embedding.weight.device)  # (B, L)
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, D)
        x = self.transformer(x)  # (B, L, D)
        return self.ln_final(x)
