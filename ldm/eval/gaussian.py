"""Gaussian toy data with a closed-form ideal denoiser: x0 ~ N(μ_c, s_c²) per channel (tests, sampler moments).

For x = x0 + σ·ε (VE), x and x0 are jointly Gaussian per dimension, so
E[x0 | x] = μ + Cov(x0, x)/Var(x)·(x − μ) = μ + s²/(s² + σ²)·(x − μ) = (s²·x + σ²·μ)/(s² + σ²).
The network ``model_fn(x_t, t)`` is this denoiser seen through the schedule and a parameterisation: σ =
schedule.sigma_at(t), (α, σ_t) = schedule.alpha_sigma(σ), x = x_t/α, and the output is
``param.from_x0(E[x0 | x], x_t, α, σ_t)``.
"""

from __future__ import annotations

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


def ideal_model_fn(schedule: Schedule, parameterization: str):
    """The ideal VP network ``model_fn(x_t, t)`` predicting eps / v / x0 for the Gaussian data."""
    param = get_parameterization(parameterization)

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        sigma = schedule.sigma_at(t.float())  # (B,)
        alpha, sigma_t = (append_dims(v, x_t.ndim) for v in schedule.alpha_sigma(sigma))  # (B, 1, 1, 1)
        x0 = ideal_x0(x_t / alpha, sigma)
        return param.from_x0(x0, x_t, alpha, sigma_t)

    return model_fn


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of (N, C, H, W) samples."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.std(1)
