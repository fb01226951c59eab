"""Rectified flow / flow matching as a ``Schedule``: the straight path x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1].

Liu et al. 2022 ("Flow Straight and Fast"), Lipman et al. 2023 ("Flow Matching"), Esser et al. 2024 (SD3, §2-3).
In the VE coordinates every sampler uses, σ = t/(1 − t): x_t/(1 − t) = x0 + σ·ε, so α = 1 − t = 1/(1 + σ) and
σ_t = t = σ/(1 + σ). A VE Euler step between σ and σ' is then exactly the flow's Euler step between t and t'
(tests/diffusion/test_flow.py), and DPM-Solver++ and the others run unchanged. The network is told t·``time_scale``
(1000, as SD3 and diffusers' FlowMatchEulerDiscreteScheduler).

Training draws t ``uniform`` on [0, 1] or ``logit_normal`` (SD3's default: logit(t) ~ N(``logit_mean``,
``logit_std``²), mean 0, std 1), then applies SD3's ``shift`` s, t ← s·t/(1 + (s − 1)·t) (eq. 23: s > 1 spends
more steps at high noise, for larger latents; SD3 uses 3.0 at 1024 px; 1.0 leaves t as drawn). Sampling
ladders are uniform in t from ``t_max`` to 0 with the same shift, or Karras et al.'s in σ. ``t_max`` < 1 keeps
σ finite: sampling starts from noise scaled by σ(t_max) ≈ 10⁴, i.e. x_t = ε + 10⁻⁴·(x0 − ε).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ldm.diffusion.schedule import Schedule
from ldm.diffusion.spacing import KARRAS_RHO, TIMESTEP_SPACINGS, karras_sigmas

TimeSampling = Literal["uniform", "logit_normal"]
TIME_SAMPLINGS = ("uniform", "logit_normal")
DEFAULT_TIME_SCALE = 1000.0  # the network sees t·1000, as SD3's transformer and diffusers' flow scheduler
DEFAULT_T_MAX = 1.0 - 1e-4  # σ(t_max) ≈ 10⁴: finite, and the noise at t_max is ε up to 1e-4
SD3_LOGIT_MEAN, SD3_LOGIT_STD = 0.0, 1.0  # Esser et al. 2024, §3.1 "lognorm(0.00, 1.00)"


def shift_t(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift of t (Esser et al. 2024, eq. 23): s·t / (1 + (s − 1)·t); identity at s = 1."""
    return shift * t / (1 + (shift - 1) * t)


class FlowSchedule(Schedule):
    """The rectified-flow path (module docstring), with SD3's training time distributions and shift."""

    def __init__(self, time_sampling: TimeSampling = "logit_normal", logit_mean: float = SD3_LOGIT_MEAN,
                 logit_std: float = SD3_LOGIT_STD, shift: float = 1.0, time_scale: float = DEFAULT_TIME_SCALE,
                 t_max: float = DEFAULT_T_MAX):
        super().__init__()
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, got {time_sampling!r}")
        if shift <= 0 or logit_std <= 0 or not 0 < t_max < 1:
            raise ValueError(f"need shift > 0, logit_std > 0 and 0 < t_max < 1; got {shift}, {logit_std}, {t_max}")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.shift, self.time_scale, self.t_max = shift, time_scale, t_max

    @staticmethod
    def t_of(sigma: Tensor) -> Tensor:
        """The path's time t = σ/(1 + σ) of VE noise levels."""
        return sigma / (1 + sigma)

    @staticmethod
    def sigma_of(t: Tensor) -> Tensor:
        """VE σ = t/(1 − t) of path times."""
        return t / (1 - t)

    @property
    def sigma_min(self) -> Tensor:
        """σ = 0 is reached (t = 0 is clean data); the smallest positive σ a ladder visits is its last step."""
        return torch.tensor(0.0)

    @property
    def sigma_max(self) -> Tensor:
        """σ(t_max)."""
        return self.sigma_of(torch.tensor(self.t_max, dtype=torch.float64)).float()

    def alpha_sigma(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """α = 1 − t = 1/(1 + σ), σ_t = t = σ/(1 + σ)."""
        alpha = 1 / (1 + sigma)
        return alpha, sigma * alpha

    def timestep(self, sigma: Tensor) -> Tensor:
        """t·time_scale."""
        return self.t_of(sigma) * self.time_scale

    def sigma_at(self, timestep: Tensor) -> Tensor:
        """σ of the network time input t·time_scale."""
        return self.sigma_of(timestep / self.time_scale)

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """(n,) training times: uniform or logit-normal, shifted, at most t_max."""
        if self.time_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))
        return shift_t(t, self.shift).clamp(max=self.t_max)

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        """σ of ``sample_t``'s draws."""
        return self.sigma_of(self.sample_t(n, generator, device))

    def ode_coordinates(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The flow state x_t = α·x and time t: dx_t/dt = (x_t − x̂0)/t = v, where the path is straight."""
        return self.alpha_sigma(sigma)

    def default_spacing(self, sampler: str) -> str:
        """Uniform in t (SD3, diffusers' FlowMatchEulerDiscreteScheduler), unless the sampler's name asks for Karras."""
        return "karras" if sampler.endswith("karras") else "linspace"

    def ladder(self, steps: int, spacing: str = "linspace", rho: float = KARRAS_RHO) -> Tensor:
        """(steps + 1,) descending σ ending with 0: uniform in t from t_max, shifted (every timestep spacing), or
        Karras et al.'s ramp in σ from σ(t_max) to σ at the shifted last uniform step."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        t = shift_t(torch.linspace(self.t_max, 0, steps + 1, dtype=torch.float64), self.shift)  # (steps + 1,)
        if spacing == "karras":
            ramp = karras_sigmas(steps, self.sigma_of(t[-2]).item(), self.sigma_of(t[0]).item(), rho)
            return torch.cat([ramp, ramp.new_zeros(1)]).float()
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}, karras")
        return self.sigma_of(t).float()
