"""Gaussian toy data with closed-form ideal denoisers (tests, sampler moments, classifier guidance).

The Gaussian: x0 ~ N(μ_c, s_c²) per channel. The mixture: a whole image is from component k with probability
π_k, x0 = μ_k + s_k·z (every dimension), so its exact noisy classifier p(k | x) is closed form too.

For x = x0 + σ·ε (VE), x and x0 are jointly Gaussian per dimension, so
E[x0 | x] = μ + Cov(x0, x)/Var(x)·(x − μ) = μ + s²/(s² + σ²)·(x − μ) = (s²·x + σ²·μ)/(s² + σ²).
The network ``model_fn(x_t, t)`` is this denoiser seen through the schedule and a parameterisation: σ =
schedule.sigma_at(t), (α, σ_t) = schedule.alpha_sigma(σ), x = x_t/α, and the output is
``param.from_x0(E[x0 | x], x_t, α, σ_t)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ldm.diffusion.denoiser import append_dims
from ldm.diffusion.parameterization import get_parameterization
from ldm.diffusion.schedule import Schedule

MEAN = torch.tensor([0.5, -0.7])  # μ per channel
STD = torch.tensor([0.6, 1.3])  # s per channel
CHANNELS = MEAN.numel()


def sample_data(n: int, size: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """(n, C, size, size) draws of the data distribution."""
    z = torch.randn(n, CHANNELS, size, size, generator=generator)
    return MEAN.view(1, -1, 1, 1) + STD.view(1, -1, 1, 1) * z


def ideal_x0(x: Tensor, sigma: Tensor) -> Tensor:
    """E[x0 | x] for x = x0 + σ·ε, σ of shape (B,)."""
    s2 = append_dims(sigma, x.ndim) ** 2
    var, mean = STD.view(1, -1, 1, 1) ** 2, MEAN.view(1, -1, 1, 1)
    return (var * x + s2 * mean) / (var + s2)


def ideal_model_fn(schedule: Schedule, parameterization: str, x0_fn: Callable[[Tensor, Tensor], Tensor] = ideal_x0):
    """The ideal network ``model_fn(x_t, t)`` predicting eps / v / x0 / velocity for data whose E[x0 | x] (VE x,
    σ (B,)) is ``x0_fn`` (default: the Gaussian's)."""
    param = get_parameterization(parameterization)

    def model_fn(x_t: Tensor, t: Tensor, **unused) -> Tensor:
        sigma = schedule.sigma_at(t.float())  # (B,)
        alpha, sigma_t = (append_dims(v, x_t.ndim) for v in schedule.alpha_sigma(sigma))  # (B, 1, 1, 1)
        x0 = x0_fn(x_t / alpha, sigma)
        return param.from_x0(x0, x_t, alpha, sigma_t)

    return model_fn


MIXTURE_MEANS = torch.tensor([-1.0, 1.0])  # μ_k
MIXTURE_STDS = torch.tensor([0.3, 0.5])  # s_k
MIXTURE_LOG_WEIGHTS = torch.log(torch.tensor([0.5, 0.5]))  # log π_k


def sample_mixture(n: int, shape: tuple[int, ...] = (1, 4, 4), generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor]:
    """(images (n, *shape), components (n,)) of the mixture."""
    k = torch.multinomial(MIXTURE_LOG_WEIGHTS.exp(), n, replacement=True, generator=generator)  # (n,)
    z = torch.randn(n, *shape, generator=generator)
    return append_dims(MIXTURE_MEANS[k], z.ndim) + append_dims(MIXTURE_STDS[k], z.ndim) * z, k


def mixture_logits(x: Tensor, sigma: Tensor) -> Tensor:
    """log p(k | x) + const, (B, K), for VE x = x0 + σ·ε of the mixture: every dimension of an image shares k."""
    var = MIXTURE_STDS**2 + append_dims(sigma, 2) ** 2  # (B, K)
    flat = x.flatten(1)  # (B, D)
    sq = (flat[:, None, :] - MIXTURE_MEANS[None, :, None]).pow(2).sum(-1)  # (B, K)
    return MIXTURE_LOG_WEIGHTS - 0.5 * sq / var - 0.5 * flat.shape[1] * var.log()


def mixture_x0(x: Tensor, sigma: Tensor) -> Tensor:
    """E[x0 | x] of the mixture: each component's Gaussian posterior mean, weighted by p(k | x)."""
    weights = mixture_logits(x, sigma).softmax(-1)  # (B, K)
    noise_var = append_dims(sigma, x.ndim) ** 2  # (B, 1, 1, 1)
    out = torch.zeros_like(x)
    for k, (mean, std) in enumerate(zip(MIXTURE_MEANS, MIXTURE_STDS)):
        posterior_mean = (std**2 * x + noise_var * mean) / (std**2 + noise_var)
        out = out + append_dims(weights[:, k], x.ndim) * posterior_mean
    return out


def mixture_classifier_fn(schedule: Schedule) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact noise-aware classifier ``classifier(x_t, t) → logits`` of the mixture on ``schedule``'s path."""

    def classifier(x_t: Tensor, t: Tensor) -> Tensor:
        sigma = schedule.sigma_at(t.float())
        alpha, _ = schedule.alpha_sigma(sigma)
        return mixture_logits(x_t / append_dims(alpha, x_t.ndim), sigma)

    return classifier


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of (N, C, H, W) samples."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.std(1)
