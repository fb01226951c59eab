"""Which noise levels a sampler visits: timestep spacings of LDM / diffusers, and Karras et al.'s σ ramp.

For T training steps and n sampling steps (cf. diffusers' DDIMScheduler ``timestep_spacing``):

- ``leading``  t = (n−1−i)·(T // n) + steps_offset, i = 0 … n−1. With ``steps_offset=1`` this is
  Stable Diffusion's / LDM's DDIM "uniform" selection (T=1000, n=50: 981, 961, …, 1). Never
  reaches t = T−1, so it is wrong for zero-terminal-SNR models (Lin et al. 2023, Table 2).
- ``trailing`` t = round(T − i·T/n) − 1 (T=1000, n=10: 999, 899, …, 99). Starts at t = T−1.
- ``linspace`` t = round(linspace(0, T−1, n)) reversed (T=1000, n=10: 999, 888, …, 0).
  diffusers' DDIMScheduler rounds like this; its Euler schedulers and k-diffusion keep the
  fractional t (differences ≤ 0.5 timestep).
- ``karras``   σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7 (Karras et al. 2022,
  eq. 5), between the schedule's σ at t = 0 and t = T−1.

A schedule's ``ladder(steps, spacing)`` reads its σ at those points and appends a final 0: (n+1,) descending.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Spacing = Literal["leading", "trailing", "linspace", "karras"]
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SPACINGS = TIMESTEP_SPACINGS + ("karras",)
SD_STEPS_OFFSET = 1  # Stable Diffusion's scheduler config: leading timesteps shifted by one
KARRAS_RHO = 7.0


def get_timesteps(num_timesteps: int, steps: int, spacing: str, steps_offset: int = SD_STEPS_OFFSET) -> Tensor:
    """The (steps,) descending integer timesteps of a timestep spacing (module docstring)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "leading":
        t = (i * (num_timesteps // steps)).flip(0) + steps_offset
    elif spacing == "trailing":
        t = (num_timesteps - i * (num_timesteps / steps)).round() - 1
    elif spacing == "linspace":
        t = (i * ((num_timesteps - 1) / max(steps - 1, 1))).round().flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    t = t.long()
    if t.max() > num_timesteps - 1 or t.min() < 0:
        raise ValueError(
            f"{spacing} spacing with {steps} steps and steps_offset={steps_offset} reaches t={t.max().item()} "
            f"outside [0, {num_timesteps - 1}]; use fewer steps, steps_offset=0, or 'trailing'"
        )
    return t


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. (2022) eq. 5: (steps,) σ from sigma_max down to sigma_min, denser near sigma_min."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


# Spacing each sampler uses unless told: DDPM walks every step from T−1, DDIM as LDM / SD
# (leading + offset 1), Euler and Heun as k-diffusion / diffusers' Euler (linspace), DPM-Solver++(2M) on
# Karras et al.'s ladder (std error on exact Gaussian data at 20 steps: 1.3 % with SD's schedule, against
# 3.5-11 % on linspace; python scripts/sampler_moments.py). A schedule may choose otherwise (``default_spacing``).
DEFAULT_SPACING: dict[str, str] = {
    "ddpm": "trailing",
    "ddim": "leading",
    "euler": "linspace",
    "euler_a": "linspace",
    "heun": "linspace",
    "dpmpp_2m": "karras",
    "dpmpp_2m_karras": "karras",
}
