"""U-Net building blocks with openaimodel's names, and the encoder half shared by UNetModel and ControlNet.

Names follow latent-diffusion / stablediffusion's ``ldm/modules/diffusionmodules/openaimodel.py``:
ResBlock (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``), Downsample (``op``),
Upsample (``conv``), AttentionBlock (``norm``, ``qkv``, ``proj_out``), TimestepEmbedSequential.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nets.unet.attention import (
    SpatialTransformer,
    attention,
    maybe_checkpoint,
    resolve_backend,
    zero_module,
)

NORM_GROUPS = 32  # GroupNorm groups everywhere in the U-Net (openaimodel's `normalization`)
TIME_EMBED_MULT = 4  # time embedding width = 4 × model_channels
MAX_PERIOD = 10_000  # sinusoidal timestep embedding's longest period
SUPPORTED_DIMS = (2,)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = MAX_PERIOD) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) → (B, dim) fp32, laid out [cos | sin]."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as openaimodel; computed in the input dtype (PyTorch accumulates low precision in fp32)."""
    return nn.GroupNorm(NORM_GROUPS, channels)


class TimestepBlock(nn.Module, ABC):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, C, H, W) and the timestep embedding (B, D) → (B, C', H', W')."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to TimestepBlocks and `context` to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, C, H, W) → (B, C', H', W')."""
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 conv (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C', 2H, 2W)."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """×2 downsampling: a stride-2 3×3 conv (`op`) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C', H/2, W/2)."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added, or FiLM scale/shift), optionally up/down."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, C, H, W), emb (B, E) → (B, C_out, H', W')."""
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            norm, act, conv = self.in_layers
            h = conv(self.h_upd(act(norm(x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]  # (B, C_out or 2·C_out, 1, 1)
        if self.use_scale_shift_norm:
            norm, act, drop, conv = self.out_layers
            scale, shift = emb_out.chunk(2, dim=1)
            h = conv(drop(act(norm(h) * (1 + scale) + shift)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels (the non-transformer U-Net's block), qkv split in openaimodel's legacy order."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.backend = resolve_backend(backend)
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T), channels ordered (heads, q/k/v, d)
        q, k, v = rearrange(qkv, "b (h three d) t -> three b t (h d)", three=3, h=self.num_heads)
        out = attention(q, k, v, self.num_heads, self.backend)  # (B, T, C)
        out = self.proj_out(rearrange(out, "b t c -> b c t"))
        return (x + out).reshape(b, c, h, w)


@dataclass(frozen=True)
class BlockFactory:
    """The settings every U-Net / ControlNet block shares, and the openaimodel rules for building them."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    dropout: float
    conv_resample: bool
    use_checkpoint: bool
    num_heads: int
    num_head_channels: int
    num_heads_upsample: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_spatial_transformer: bool
    transformer_depth: tuple[int, ...]  # transformer blocks per SpatialTransformer, per level
    transformer_depth_middle: int
    context_dim: int | None
    use_linear_in_transformer: bool
    legacy: bool
    attention: str

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding (4 × model_channels)."""
        return self.model_channels * TIME_EMBED_MULT

    def resblock(self, ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
        """A ResBlock with the shared settings."""
        return ResBlock(
            ch, self.time_embed_dim, self.dropout, out_channels=out_ch, use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm, up=up, down=down,
        )

    def attention_layer(self, ch: int, depth: int, upsample: bool = False) -> nn.Module:
        """A SpatialTransformer of ``depth`` blocks (or an AttentionBlock) at width ch; heads as openaimodel's."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.use_spatial_transformer:
            return SpatialTransformer(
                ch, heads, dim_head, depth=depth, context_dim=self.context_dim,
                use_linear=self.use_linear_in_transformer, use_checkpoint=self.use_checkpoint, backend=self.attention,
            )
        if self.legacy and self.num_head_channels == -1:  # legacy: the decoder's blocks use num_heads_upsample
            heads = self.num_heads_upsample if upsample else self.num_heads
        return AttentionBlock(ch, num_heads=heads, use_checkpoint=self.use_checkpoint, backend=self.attention)

    def build_encoder(self, in_channels: int) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
        """input_blocks, middle_block and the channel count of every input block's output (the skips)."""
        ch = self.model_channels
        input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [self.resblock(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(self.attention_layer(ch, self.transformer_depth[level]))
                input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = self.resblock(ch, ch, down=True) if self.resblock_updown else Downsample(ch, self.conv_resample)
                input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        middle = self.attention_layer(ch, self.transformer_depth_middle)
        middle_block = TimestepEmbedSequential(self.resblock(ch), middle, self.resblock(ch))
        return input_blocks, middle_block, skip_channels

    def build_decoder(self, skip_channels: Sequence[int]) -> nn.ModuleList:
        """output_blocks: each concatenates one skip (popped last-first) and mirrors the encoder."""
        skips = list(skip_channels)
        ch = skips[-1]
        ds = 2 ** (len(self.channel_mult) - 1)
        output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks[level] + 1):
                layers: list[nn.Module] = [self.resblock(ch + skips.pop(), self.model_channels * mult)]
                ch = self.model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self.attention_layer(ch, self.transformer_depth[level], upsample=True))
                if level and i == self.num_res_blocks[level]:
                    up = self.resblock(ch, ch, up=True) if self.resblock_updown else Upsample(ch, self.conv_resample)
                    layers.append(up)
                    ds //= 2
                output_blocks.append(TimestepEmbedSequential(*layers))
        return output_blocks


def make_block_factory(
    model_channels: int,
    num_res_blocks: int | Sequence[int],
    attention_resolutions: Sequence[int],
    dropout: float,
    channel_mult: Sequence[int],
    conv_resample: bool,
    dims: int,
    use_checkpoint: bool,
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_spatial_transformer: bool,
    transformer_depth: int | Sequence[int],
    context_dim: int | None,
    use_linear_in_transformer: bool,
    legacy: bool,
    attention: str,
    transformer_depth_middle: int | None = None,
) -> BlockFactory:
    """Validate UNetModel / ControlNet arguments (clear errors instead of openaimodel's asserts) → BlockFactory."""
    if dims not in SUPPORTED_DIMS:
        raise ValueError(f"dims={dims} is not supported; only 2-D U-Nets (dims=2) are implemented")
    channel_mult = tuple(int(m) for m in channel_mult)
    num_res_blocks = per_level("num_res_blocks", num_res_blocks, channel_mult)
    depths = per_level("transformer_depth", transformer_depth, channel_mult)
    if use_spatial_transformer and context_dim is None:
        raise ValueError("use_spatial_transformer=True needs context_dim (the width of the cross-attention context)")
    if context_dim is not None and not use_spatial_transformer:
        raise ValueError("context_dim is set but use_spatial_transformer=False: cross-attention needs the transformer")
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("set either num_heads or num_head_channels")
    for level, mult in enumerate(channel_mult):
        ch = mult * model_channels
        if ch % NORM_GROUPS:
            raise ValueError(
                f"model_channels × channel_mult = {ch} is not divisible by the {NORM_GROUPS} GroupNorm groups"
            )
        has_attention = 2**level in attention_resolutions or level == len(channel_mult) - 1  # + middle block
        head_width = num_heads if num_head_channels == -1 else num_head_channels
        if has_attention and ch % head_width:
            raise ValueError(
                f"width {ch} at level {level} is not divisible by "
                f"{'num_heads' if num_head_channels == -1 else 'num_head_channels'}={head_width}"
            )
    return BlockFactory(
        model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_resolutions), dropout=dropout, conv_resample=conv_resample,
        use_checkpoint=use_checkpoint, num_heads=num_heads, num_head_channels=num_head_channels,
        num_heads_upsample=num_heads if num_heads_upsample == -1 else num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
        use_spatial_transformer=use_spatial_transformer, transformer_depth=depths,
        transformer_depth_middle=depths[-1] if transformer_depth_middle is None else int(transformer_depth_middle),
        context_dim=context_dim, use_linear_in_transformer=use_linear_in_transformer, legacy=legacy,
        attention=resolve_backend(attention),
    )


def per_level(name: str, value: int | Sequence[int], channel_mult: Sequence[int]) -> tuple[int, ...]:
    """An int (the same at every level) or one entry per level of channel_mult, as a tuple."""
    if isinstance(value, int):
        return (value,) * len(channel_mult)
    values = tuple(int(v) for v in value)
    if len(values) != len(channel_mult):
        raise ValueError(f"{name} {list(values)} must be an int or have one entry per level of channel_mult "
                         f"{list(channel_mult)}")
    return values


def as_batch_timesteps(timesteps: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """Timesteps as a (B,) tensor: a Python number or a 0-d / 1-element tensor is broadcast to the batch."""
    t = torch.as_tensor(timesteps, device=device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must have shape ({batch},) or be a scalar, got {tuple(t.shape)}")
    return t
