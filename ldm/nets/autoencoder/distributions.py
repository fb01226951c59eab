"""The VAE posterior: a diagonal Gaussian over the latent, as latent-diffusion's DiagonalGaussianDistribution."""

from __future__ import annotations

import math
from typing import Sequence

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LATENT_DIMS = (1, 2, 3)  # C, H, W: sums run over these, leaving the batch


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) from ``parameters`` = concat(mean, logvar) along channels (B, 2C, H, W).

    Statistics are kept in fp32 (the encoder may run under bf16/fp16 autocast); ``deterministic`` makes
    the distribution a point mass at the mean (std 0, KL 0).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters.float(), 2, dim=1)  # (B, C, H, W) each
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · ε, ε ~ N(0, I) (drawn from ``generator`` when given)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self ‖ other), or KL(self ‖ N(0, I)) when ``other`` is None, summed over C, H, W → (B,)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=LATENT_DIMS)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = LATENT_DIMS) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=list(dims))
