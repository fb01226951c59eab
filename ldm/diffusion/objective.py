"""The training objective as one small object (cf. EDM's ``EDMLoss``): draw σ, noise, target, weight, mean.

Ho et al. 2020 (DDPM), Algorithm 1, generalised to any ``Schedule`` and to ε / v / x0 targets; optional
min-SNR-γ weighting (Hang et al. 2023) and offset noise (Guttenberg 2023: ε + s·ε_c with ε_c ~ N(0, 1) per
sample and channel, constant over space, so the model learns to change an image's mean brightness). The
network is called through the same ``Denoiser`` as the samplers, at the same kind of noise level (VE σ).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ldm.diffusion.denoiser import Denoiser, append_dims
from ldm.diffusion.parameterization import Parameterization, get_parameterization
from ldm.diffusion.schedule import Schedule

Weighting = Literal["none", "min_snr"]
MIN_SNR_GAMMA = 5.0  # Hang et al.'s recommended γ

# weight(snr (B,), parameterisation, γ) -> (B,) weight on the parameterisation's own MSE
WEIGHTINGS: dict[str, Callable[[Tensor, Parameterization, float], Tensor]] = {
    "none": lambda snr, param, gamma: torch.ones_like(snr),
    "min_snr": lambda snr, param, gamma: param.min_snr_weight(snr, gamma),
}


class LossTerms(NamedTuple):
    """Per-sample weighted losses (B,) and the noise levels σ (B,) they were drawn at, for logging."""

    loss: Tensor
    sigma: Tensor


class DiffusionObjective(nn.Module):
    """Schedule + parameterisation + weighting + offset noise; ``objective(network, x0, cond)`` → scalar loss.

    An ``nn.Module`` only so that the schedule's tables move with the model (it has no parameters).
    """

    def __init__(self, schedule: Schedule, parameterization: Literal["eps", "v", "x0", "flow"] = "eps",
                 weighting: Weighting = "none", min_snr_gamma: float = MIN_SNR_GAMMA, offset_noise: float = 0.0):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.schedule = schedule
        self.parameterization = get_parameterization(parameterization)
        self.weighting, self.min_snr_gamma, self.offset_noise = weighting, min_snr_gamma, offset_noise

    def denoiser(self, network: Callable[..., Tensor]) -> Denoiser:
        """``network`` as a denoiser on this objective's schedule and parameterisation (what samplers call)."""
        return Denoiser(network, self.schedule, self.parameterization)

    def noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ε ~ N(0, I) shaped like x0, plus offset noise constant over space when configured."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.offset_noise:
            channel_shape = x0.shape[:2] + (1,) * (x0.ndim - 2)  # (B, C, 1, 1)
            noise = noise + self.offset_noise * torch.randn(channel_shape, generator=generator, device=x0.device,
                                                            dtype=x0.dtype)
        return noise

    def loss_terms(self, network: Callable[..., Tensor], x0: Tensor, cond: dict | None = None,
                   generator: torch.Generator | None = None, noise: Tensor | None = None) -> LossTerms:
        """Per-sample losses of ``network(x_t, t, **cond)`` on clean x0 (B, C, H, W); ``noise`` paired with x0
        (reflow's couplings) instead of fresh ε when given."""
        sigma = self.schedule.sample_sigmas(x0.shape[0], generator, x0.device)  # (B,)
        noise = self.noise(x0, generator) if noise is None else noise
        prediction = self.denoiser(network).predict(x0 + append_dims(sigma, x0.ndim) * noise, sigma, **(cond or {}))
        target = self.parameterization.target(x0, noise, prediction.alpha, prediction.sigma)
        mse = (prediction.output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        weight = WEIGHTINGS[self.weighting](self.schedule.snr(sigma), self.parameterization, self.min_snr_gamma)
        return LossTerms(weight * mse, sigma)

    def forward(self, network: Callable[..., Tensor], x0: Tensor, cond: dict | None = None,
                generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """The scalar training loss: ``loss_terms`` averaged over the batch."""
        return self.loss_terms(network, x0, cond, generator, noise).loss.mean()
