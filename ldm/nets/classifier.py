"""A noise-aware classifier on latents: the U-Net's encoder half with a pooling head (Dhariwal & Nichol 2021,
``EncoderUNetModel`` with ``pool="adaptive"``), trained on noisy latents at every noise level for classifier
guidance (``ldm.diffusion.classifier_guidance``)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ldm.nets.unet.blocks import Downsample, ResBlock, as_batch_timesteps, normalization, timestep_embedding

TIME_EMBED_MULT = 4  # time embedding width / model_channels, as the U-Net's


class LatentClassifier(nn.Module):
    """``classifier(x_t, t) → logits (B, n_classes)``: conv in, ResBlocks (time-conditioned) with downsampling
    between levels, a middle ResBlock, then GroupNorm, SiLU, global average pool and a linear head."""

    def __init__(self, in_channels: int, n_classes: int, model_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, dropout: float = 0.0):
        super().__init__()
        self.model_channels = model_channels
        emb_dim = TIME_EMBED_MULT * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, emb_dim, dropout, out_channels=mult * model_channels))
                ch = mult * model_channels
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(ch, use_conv=True))
        blocks.append(ResBlock(ch, emb_dim, dropout))  # the middle
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, n_classes))
        self.n_classes = n_classes

    def forward(self, x: Tensor, timesteps: Tensor | float) -> Tensor:
        """x (B, C, h, w) on the schedule's path, timesteps (B,) as the diffusion model's → logits (B, n_classes)."""
        t = as_batch_timesteps(timesteps, x.shape[0], x.device)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.conv_in.weight.dtype))  # (B, E)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))  # (B, C0, h, w)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return self.out(h).float()  # (B, n_classes)

    @torch.no_grad()
    def accuracy(self, x: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        """Share of ``labels`` predicted at these inputs."""
        return (self(x, timesteps).argmax(-1) == labels).float().mean()
