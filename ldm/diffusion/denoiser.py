"""Turn a VP network ``model_fn(x_t, t, **cond)`` into a k-diffusion VE denoiser ``D(x, σ, **cond) → x0``.

VE form (Karras et al. 2022): x = x0 + σ·ε. The VP point with the same noise level is
x_t = x / sqrt(1 + σ²) = α·x0 + σ_vp·ε with α = 1/sqrt(1 + σ²), σ_vp = σ/sqrt(1 + σ²), i.e.
ᾱ = 1/(1 + σ²); the network's timestep is t = schedule.sigma_to_t(σ) (continuous, as k-diffusion's
DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser; ``quantize=True`` rounds it to the nearest integer).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ldm.diffusion.parameterization import Parameterization, get_parameterization
from ldm.diffusion.schedule import NoiseSchedule

Denoiser = Callable[..., Tensor]  # denoiser(x, sigma, **cond) -> x0, sigma of shape (B,)


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against an ndim tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a (B,) floating tensor on x's device (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    sigma = sigma if sigma.is_floating_point() else sigma.float()
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def make_denoiser(
    model_fn: Callable[..., Tensor],
    schedule: NoiseSchedule,
    parameterization: str | Parameterization,
    quantize: bool = False,
) -> Denoiser:
    """Wrap ``model_fn(x_t, t, **cond)`` (VP input, t in [0, T−1]) as ``denoiser(x, sigma, **cond) → x0``."""
    param = get_parameterization(parameterization)

    def denoiser(x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        sigma = batch_sigma(sigma, x)  # (B,)
        t = schedule.sigma_to_t(sigma)  # (B,) continuous
        t = t.round().long() if quantize else t
        s = append_dims(sigma, x.ndim)  # (B, 1, 1, 1)
        alpha, sigma_vp = (1 + s**2).rsqrt(), s * (1 + s**2).rsqrt()
        x_t = x * alpha
        model_out = model_fn(x_t, t.to(x.device), **cond)
        return param.to_x0(model_out, x_t, alpha, sigma_vp)

    return denoiser
