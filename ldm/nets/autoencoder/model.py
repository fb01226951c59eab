"""AutoencoderKL, the network: encoder → posterior over latents → decoder (latent-diffusion's names).

State-dict keys are latent-diffusion's (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``), so
SD's VAE weights load into a model built from SD's ddconfig. Training lives in ``ldm.systems.autoencoder``.

``bicubic_skip=True`` (off by default, and in SD's files) adds a fixed path around the networks: the first three
latent channels' mean gets the image bicubic-downsampled by f, and the decoder's output the first three latent
channels bicubic-upsampled by f. The learned parts start at zero, so an untrained model *is* bicubic ×f
down-and-up and training only learns what bicubic misses (README, "A VAE for photographs").
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ldm.core.colour import bicubic_resize
from ldm.nets.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.nets.autoencoder.encoder_decoder import Decoder, Encoder

DEFAULT_CH_MULT = (1, 2, 4, 8)  # Encoder / Decoder's default levels
RGB = 3
SKIP_LOGVAR_INIT = -6.0  # with the bicubic skip, posteriors start narrow (std ≈ 0.05), not at std 1


def downsampling_factor(ddconfig: dict) -> int:
    """Pixels per latent cell along each side, f = 2^(len(ch_mult) − 1), for an encoder / decoder config."""
    return 2 ** (len(ddconfig.get("ch_mult", DEFAULT_CH_MULT)) - 1)


def check_ddconfig(ddconfig: dict) -> None:
    """Reject a ddconfig key neither Encoder nor Decoder takes, naming it (a typo must not become a default)."""
    known = set(inspect.signature(Encoder).parameters) | set(inspect.signature(Decoder).parameters)
    unknown = sorted(set(ddconfig) - known)
    if unknown:
        raise ValueError(f"ddconfig.{unknown[0]}: unknown key; Encoder/Decoder take {', '.join(sorted(known))}")
    if not ddconfig.get("double_z", True):
        raise ValueError("ddconfig.double_z must be true for a KL autoencoder (the encoder emits mean and logvar)")


class AutoencoderKL(nn.Module):
    """KL-VAE: ``encode(x) → DiagonalGaussianDistribution``, ``decode(z) → x̂``."""

    def __init__(self, ddconfig: dict, embed_dim: int, channels_last: bool = False, bicubic_skip: bool = False):
        super().__init__()
        check_ddconfig(ddconfig)
        if bicubic_skip and (embed_dim < RGB or ddconfig.get("out_ch", RGB) != RGB):
            raise ValueError(f"bicubic_skip needs embed_dim ≥ {RGB} and RGB images, got embed_dim={embed_dim}")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.downsampling_factor = downsampling_factor(ddconfig)
        self.channels_last = channels_last
        self.bicubic_skip = bicubic_skip
        if bicubic_skip:  # the learned parts start at zero: an untrained model is the bicubic round trip
            for conv in (self.decoder.conv_out, self.quant_conv):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
            nn.init.constant_(self.quant_conv.bias[embed_dim:], SKIP_LOGVAR_INIT)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last activations when enabled: oneDNN's bf16 convolutions on CPU (like cuDNN's tensor-core
        ones) work in NHWC and reorder NCHW inputs at every conv: bf16 decoding at 256 px ran at 0.35× of diffusers'
        speed, 1.02× with this (``python scripts/bench.py --only vae``). Off by default: at 32 px it is slower.
        Results are returned in the default layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] → posterior over latents (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(self._layout(x))).contiguous()  # (B, 2·embed_dim, H/f, W/f)
        if self.bicubic_skip:
            small = bicubic_resize(x, moments.shape[-2:], antialias=True)  # (B, 3, H/f, W/f) fp32
            moments = torch.cat([moments[:, :RGB] + small, moments[:, RGB:]], dim=1)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) → images (B, 3, h·f, w·f)."""
        z = z.to(self.post_quant_conv.weight.dtype)  # the posterior is fp32; a half model takes half latents
        x = self.decoder(self.post_quant_conv(self._layout(z))).contiguous()  # (B, 3, h·f, w·f)
        if self.bicubic_skip:
            x = x.float() + bicubic_resize(z[:, :RGB], x.shape[-2:], antialias=False)  # fp32 (the skip's precision)
        return x

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); the latent is a posterior sample, or its mode."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight
