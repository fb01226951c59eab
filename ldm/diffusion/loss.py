"""The training objective: sample t and ε, noise x0, regress the parameterisation's target, weight, mean.

Ho et al. 2020 (DDPM), Algorithm 1, generalised to ε / v / x0 targets; optional min-SNR-γ weighting
(Hang et al. 2023) and offset noise (Guttenberg 2023: ε + s·ε_c with ε_c ~ N(0, 1) per sample and
channel, constant over space, so the model learns to change an image's mean brightness).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from ldm.diffusion.denoiser import append_dims
from ldm.diffusion.parameterization import Parameterization, get_parameterization
from ldm.diffusion.schedule import NoiseSchedule

Weighting = Literal["none", "min_snr"]
MIN_SNR_GAMMA = 5.0  # Hang et al.'s recommended γ

# weight(snr (B,), parameterisation, γ) -> (B,) weight on the parameterisation's own MSE
WEIGHTINGS: dict[str, Callable[[Tensor, Parameterization, float], Tensor]] = {
    "none": lambda snr, param, gamma: torch.ones_like(snr),
    "min_snr": lambda snr, param, gamma: param.min_snr_weight(snr, gamma),
}


class LossTerms(NamedTuple):
    """Per-sample weighted losses (B,) and the timesteps (B,) they were drawn at, for logging."""

    loss: Tensor
    t: Tensor


def diffusion_loss_terms(
    model_fn: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    parameterization: str | Parameterization,
    cond: dict | None = None,
    weighting: Weighting = "none",
    min_snr_gamma: float = MIN_SNR_GAMMA,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> LossTerms:
    """Per-sample diffusion losses of ``model_fn(x_t, t, **cond)`` on clean x0 (B, C, H, W)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    param = get_parameterization(parameterization)
    b, c = x0.shape[:2]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=x0.device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise:
        channel_shape = (b, c) + (1,) * (x0.ndim - 2)  # (B, C, 1, 1)
        noise = noise + offset_noise * torch.randn(channel_shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = (append_dims(v, x0.ndim) for v in schedule.alpha_sigma(t))  # (B, 1, 1, 1) each
    x_t = alpha * x0 + sigma * noise
    target = param.target(x0, noise, alpha, sigma)
    model_out = model_fn(x_t, t, **(cond or {}))
    mse = (model_out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    weight = WEIGHTINGS[weighting](schedule.snr(t), param, min_snr_gamma)  # (B,)
    return LossTerms(weight * mse, t)


def diffusion_loss(
    model_fn: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    parameterization: str | Parameterization,
    cond: dict | None = None,
    weighting: Weighting = "none",
    min_snr_gamma: float = MIN_SNR_GAMMA,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The scalar training loss: ``diffusion_loss_terms(...)`` averaged over the batch."""
    terms = diffusion_loss_terms(
        model_fn, x0, schedule, parameterization, cond, weighting, min_snr_gamma, offset_noise, generator
    )
    return terms.loss.mean()
