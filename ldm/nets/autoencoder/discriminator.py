"""PatchGAN discriminator (pix2pix / taming-transformers' NLayerDiscriminator) and its GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL, PAD = 4, 1
LEAKY_SLOPE = 0.2
MAX_WIDTH_MULT = 8
INIT_STD = 0.02


class ActNorm(nn.Module):
    """Per-channel affine normalisation whose shift and scale are set from the first batch (Glow)."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).flatten(1)  # (C, B·H·W)
        self.loc.copy_(-flat.mean(dim=1).view_as(self.loc))
        self.scale.copy_((1.0 / (flat.std(dim=1) + self.eps)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def weights_init(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4×4 convs, one stride-1 conv, then a 1-channel logit map (B, 1, h, w)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's affine shift makes a conv bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, KERNEL, stride=2, padding=PAD),
            nn.LeakyReLU(LEAKY_SLOPE, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, MAX_WIDTH_MULT)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, KERNEL, stride=stride, padding=PAD, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(LEAKY_SLOPE, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, KERNEL, stride=1, padding=PAD))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[softplus(−D(x))] + E[softplus(D(x̂))]) — the non-saturating GAN's discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on (taming's GAN warm-up switch)."""
    return value if global_step < threshold else weight
