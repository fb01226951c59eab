"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder fed a pixel-space hint.

Names follow ControlNet's ``cldm/cldm.py`` so ``control_model.*`` of the public checkpoints loads unchanged:
``time_embed``, ``input_blocks``, ``middle_block`` (the U-Net's encoder, copied from it), ``input_hint_block``
(small conv stack bringing the hint down to latent resolution, last conv zero-initialised), ``zero_convs.N.0``
(one zero 1×1 conv per input block) and ``middle_block_out.0``. Its output — one residual per input block plus
one for the middle block — is what ``UNetModel.forward(control=…)`` adds to the U-Net's skips and middle.

The hint block has the same eight convs (``input_hint_block.{0,2,…,14}``, SiLU between) for every VAE factor f;
only the strides differ. The three convs that widen the channels (16→32, 32→96, 96→256; indices 4, 8, 12) are
stride 2 for f = 8 (SD's layout); for f = 4 the first two are, for f = 2 the first, for f = 1 none. Keeping the
indices and shapes fixed keeps SD ControlNet hint weights loadable at any factor.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ldm.nets.unet.attention import zero_module
from ldm.nets.unet.model import UNetModel, block_factory, embed_time, make_time_embed, unet_params

HINT_BLOCK_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # widths of the hint convs before the zero conv
HINT_WIDENING_CONVS = (2, 4, 6)  # positions in HINT_BLOCK_CHANNELS of the convs that may be stride 2
SD_DOWNSAMPLING_FACTOR = 8
GUESS_MODE_DECAY = 0.825  # ControlNet's guess mode: residual i of n is scaled by 0.825 ** (n - 1 - i)
COPIED_FROM_UNET = ("time_embed", "label_emb", "input_blocks", "middle_block")


def make_hint_block(hint_channels: int, model_channels: int, downsampling_factor: int = SD_DOWNSAMPLING_FACTOR) -> nn.Sequential:
    """3×3 convs with SiLU (16,16,32,32,96,96,256 ch), log2(f) of them stride 2, then a zero conv to model_channels."""
    n_down = math.log2(downsampling_factor) if downsampling_factor >= 1 else -1
    if n_down not in range(len(HINT_WIDENING_CONVS) + 1):
        raise ValueError(f"downsampling_factor must be 1, 2, 4 or 8 (the VAE's factor), got {downsampling_factor}")
    strided = set(HINT_WIDENING_CONVS[: int(n_down)])
    layers: list[nn.Module] = []
    ch = hint_channels
    for i, width in enumerate(HINT_BLOCK_CHANNELS):
        layers += [nn.Conv2d(ch, width, 3, padding=1, stride=2 if i in strided else 1), nn.SiLU()]
        ch = width
    layers.append(zero_module(nn.Conv2d(ch, model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class ControlNet(nn.Module):
    """The U-Net's encoder + middle block on (latent + embedded hint), emitting zero-conv residuals.

    Takes the U-Net's own parameters (``UNetModel``'s, by name, declared there once: ``unet_params``;
    ``out_channels`` is accepted so a U-Net's params can be reused, and ignored) plus ``hint_channels`` and the VAE's
    ``downsampling_factor`` (hint resolution / latent resolution).
    """

    def __init__(self, hint_channels: int, downsampling_factor: int = SD_DOWNSAMPLING_FACTOR, **unet: Any):
        super().__init__()
        config = unet_params({"out_channels": unet.get("in_channels"), **unet}, "ControlNet")  # (B, in) → residuals
        factory = block_factory(config)
        self.image_size = config["image_size"]
        self.in_channels = config["in_channels"]
        self.model_channels = config["model_channels"]
        self.hint_channels = hint_channels
        self.downsampling_factor = downsampling_factor

        self.time_embed, self.label_emb = make_time_embed(factory, config["num_classes"], config["adm_in_channels"])
        self.input_blocks, self.middle_block, skip_channels = factory.build_encoder(config["in_channels"])
        self.input_hint_block = make_hint_block(hint_channels, config["model_channels"], downsampling_factor)
        self.zero_convs = nn.ModuleList(_zero_conv(ch) for ch in skip_channels)
        self.middle_block_out = _zero_conv(skip_channels[-1])

    @classmethod
    def from_unet(
        cls, unet: UNetModel, hint_channels: int = 3, downsampling_factor: int = SD_DOWNSAMPLING_FACTOR
    ) -> "ControlNet":
        """A ControlNet shaped like ``unet`` (built from its own config) whose encoder, middle block and time
        embedding are copies of its own."""
        reference = next(unet.parameters())
        with torch.device(reference.device):
            controlnet = cls(hint_channels, downsampling_factor, **unet.config)
        controlnet.to(dtype=reference.dtype)
        copy_unet_weights(controlnet, unet)
        return controlnet

    def forward(
        self, x: Tensor, hint: Tensor, timesteps: Tensor | float, context: Tensor | None = None, y: Tensor | None = None
    ) -> list[Tensor]:
        """x (B, in, h, w) latents, hint (B, hint_ch, f·h, f·w) → len(input_blocks)+1 residuals for the U-Net."""
        dtype = self.time_embed[0].weight.dtype
        emb = embed_time(self.time_embed, self.label_emb, timesteps, x, y, self.model_channels)  # (B, 4C)
        context = None if context is None else context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))  # (B, C, h, w)
        if guided_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"hint of size {tuple(hint.shape[-2:])} maps to {tuple(guided_hint.shape[-2:])} but the latent is "
                f"{tuple(x.shape[-2:])}: the hint must be {self.downsampling_factor}× the latent's resolution"
            )
        h = x.to(dtype)
        residuals = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint enters after the first conv
            residuals.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


def _signature() -> inspect.Signature:
    """ControlNet's parameters as configs see them: its own, then the U-Net's (derived, never re-declared)."""
    own = [inspect.Parameter("hint_channels", inspect.Parameter.KEYWORD_ONLY, annotation=int),
           inspect.Parameter("downsampling_factor", inspect.Parameter.KEYWORD_ONLY, default=SD_DOWNSAMPLING_FACTOR,
                             annotation=int)]
    unet = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, **({"default": None} if name == "out_channels" else {}))
            for name, p in inspect.signature(UNetModel).parameters.items()]
    return inspect.Signature(own + unet)


ControlNet.__signature__ = _signature()  # what ldm.core.config checks a ControlNet node's params against


def copy_unet_weights(controlnet: ControlNet, unet: UNetModel) -> None:
    """Copy the U-Net's time_embed / label_emb / input_blocks / middle_block into the ControlNet, strictly."""
    for name in COPIED_FROM_UNET:
        source, target = getattr(unet, name), getattr(controlnet, name)
        if (source is None) != (target is None):
            raise ValueError(f"cannot copy {name}: present in only one of the U-Net and the ControlNet")
        if source is None:
            continue
        try:
            target.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(f"the ControlNet's {name} does not match the U-Net's: {e}") from e


def apply_control_scales(residuals: Sequence[Tensor], scales: float | Sequence[float]) -> list[Tensor]:
    """Scale ControlNet residuals: one float for all (control strength) or one per residual (e.g. guess mode)."""
    if isinstance(scales, (int, float)):
        return [r * scales for r in residuals]
    if len(scales) != len(residuals):
        raise ValueError(f"{len(scales)} scales for {len(residuals)} residuals")
    return [r * s for r, s in zip(residuals, scales)]


def guess_mode_scales(n: int, strength: float = 1.0) -> list[float]:
    """ControlNet's guess-mode scales strength·0.825^(n-1-i): the middle residual 1, shallow skips smallest."""
    return [strength * GUESS_MODE_DECAY ** float(n - 1 - i) for i in range(n)]


Scales = float | Sequence[float]


def controlled_forward(unet: nn.Module, control: nn.Module, x: Tensor, t: Tensor, context: Tensor | None,
                       hint: Tensor | None, scales: Scales = 1.0, only_mid_control: bool = False,
                       c_concat: Tensor | None = None) -> Tensor:
    """The U-Net's output with the ControlNet's residuals × ``scales`` (one float or one per residual) added.

    ``c_concat`` (B, C', h, w) joins the U-Net's input only (an inpainting U-Net's extra channels)."""
    unet_x = x if c_concat is None else torch.cat([x, c_concat.to(x)], dim=1)  # (B, C + C', h, w)
    if hint is None:
        return unet(unet_x, t, context=context)
    residuals = control(x, hint, t, context)  # len(input_blocks) + 1 tensors
    return unet(unet_x, t, context=context, control=apply_control_scales(residuals, scales),
                only_mid_control=only_mid_control)


class ControlledDiffusion(nn.Module):
    """``model(x_t, t, context, hint)``: the U-Net with the ControlNet's residuals × strength added.

    Without a hint it is the plain U-Net. ``strength`` is one float or one per residual; ``guess_mode`` scales
    the residuals by 0.825^(n−1−i) on top (ControlNet's guess mode: the deepest residual full, the shallowest least).
    """

    def __init__(self, diffusion_model: nn.Module, control_model: nn.Module, strength: Scales = 1.0,
                 guess_mode: bool = False, only_mid_control: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.control_model = control_model
        self.strength = strength
        self.guess_mode = guess_mode
        self.only_mid_control = only_mid_control

    def scales(self, n: int) -> Scales:
        """The scale of each of ``n`` residuals (or one for all)."""
        if not self.guess_mode:
            return self.strength
        if isinstance(self.strength, (int, float)):
            return guess_mode_scales(n, float(self.strength))
        return [s * g for s, g in zip(self.strength, guess_mode_scales(n))]

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, hint: Tensor | None = None,
                c_concat: Tensor | None = None) -> Tensor:
        """x (B, C, h, w), t (B,), context (B, T, D), hint (B, 3, f·h, f·w) in [0, 1] → (B, C, h, w)."""
        n = len(self.diffusion_model.input_blocks) + 1
        return controlled_forward(self.diffusion_model, self.control_model, x, t, context, hint, self.scales(n),
                                  self.only_mid_control, c_concat)
