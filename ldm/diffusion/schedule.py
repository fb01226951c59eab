"""Noise schedules: betas → ᾱ_t → σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), continuous σ ↔ t, SNR.

Beta-schedule names follow latent-diffusion's ``make_beta_schedule`` (what SD / LDM YAMLs say), with
diffusers' names accepted as aliases. Beware that the two projects use "linear" for different things:

==================  =============================================  ================================
kind (here)         betas                                          diffusers ``beta_schedule``
==================  =============================================  ================================
``linear``          linspace(√start, √end, T)²  (LDM's "linear")   ``scaled_linear``
``scaled_linear``   same as ``linear`` (diffusers' name for it)    ``scaled_linear``
``sqrt_linear``     linspace(start, end, T)     (LDM's name)       ``linear``  (DDPM's schedule)
``cosine``          Nichol & Dhariwal 2021, eq. 17, β ≤ 0.999      ``squaredcos_cap_v2``
==================  =============================================  ================================

So an SD config ``beta_schedule: linear, linear_start: 0.00085, linear_end: 0.012`` means the same
here as in latent-diffusion; a diffusers user's plain ``linear`` is our ``sqrt_linear``.

Zero terminal SNR (Lin et al. 2023, Algorithm 1) gives ᾱ_T = 0 and so σ_T = ∞. Training keeps the
exact ᾱ_T = 0 (the v-target at t = T is −x0, well defined); the σ table used by samplers clamps
ᾱ_T to ``ZERO_SNR_ALPHA_CUMPROD`` = 2⁻²⁴ (diffusers' choice for its Euler / DPM schedulers), so
σ_max ≈ 4096 stays finite. Use the ``trailing`` spacing (or ``karras``) so sampling starts at t = T − 1,
and a v-model: an ε-model's x0 = (x_t − σ·ε̂)/α divides by α ≈ 2⁻¹² there. The first step of a
``trailing`` ladder then spans σ ≈ 4096 → ~15, which first-order samplers (DDIM, Euler) take exactly
for a Gaussian but second-order ones (Heun, DPM++ 2M) do not: pair those with ``karras``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

BetaKind = Literal["linear", "scaled_linear", "sqrt_linear", "cosine"]

# Stable Diffusion's betas (LDM "linear" = diffusers "scaled_linear") over 1000 steps.
SD_LINEAR_START = 0.00085
SD_LINEAR_END = 0.012
DEFAULT_NUM_TIMESTEPS = 1000
COSINE_S = 8e-3  # Nichol & Dhariwal's offset s, keeps β_0 from being vanishingly small
MAX_BETA = 0.999  # cap on cosine betas, as improved-diffusion / LDM / diffusers
# ᾱ_T after zero-terminal-SNR rescaling is 0; samplers see it clamped here (diffusers: 2**-24).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def make_betas(
    kind: BetaKind,
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    linear_start: float = SD_LINEAR_START,
    linear_end: float = SD_LINEAR_END,
    cosine_s: float = COSINE_S,
) -> Tensor:
    """The (T,) float64 betas of a named schedule (LDM names; see the module docstring)."""
    if kind in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T+1,) in [0, 1]
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, MAX_BETA)
    raise ValueError(f"unknown beta schedule {kind!r}; choose linear, scaled_linear, sqrt_linear or cosine")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so ᾱ_T = 0 while ᾱ_0 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_ac = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)  # shift so the last is 0, scale so the first stays
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1 - alphas).to(betas.dtype)


class NoiseSchedule(nn.Module):
    """A discrete VP schedule: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, t = 0 … T−1, with its σ table.

    Buffers (float32, non-persistent: derived from the config, so they never clutter a state dict) use
    latent-diffusion's names: ``betas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``; plus ``sigmas`` (k-diffusion's VE noise levels, increasing in t)
    and ``log_sigmas``.
    """

    def __init__(
        self,
        kind: BetaKind = "linear",
        num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
        linear_start: float = SD_LINEAR_START,
        linear_end: float = SD_LINEAR_END,
        cosine_s: float = COSINE_S,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        betas = make_betas(kind, num_timesteps, linear_start, linear_end, cosine_s)
        self._set_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseSchedule:
        """A schedule from explicit betas (e.g. a checkpoint's ``betas`` buffer)."""
        schedule = cls.__new__(cls)
        nn.Module.__init__(schedule)
        schedule._set_betas(betas.double())
        return schedule

    def _set_betas(self, betas: Tensor) -> None:
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64
        clamped = alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_CUMPROD)  # finite σ_max under zero terminal SNR
        sigmas = ((1 - clamped) / clamped).sqrt()
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sigmas": sigmas,
            "log_sigmas": sigmas.log(),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete training timesteps."""
        return self.betas.shape[0]

    @property
    def sigma_min(self) -> Tensor:
        """σ at t = 0."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        """σ at t = T − 1 (finite even under zero terminal SNR, see module docstring)."""
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous t in [0, T−1] for σ, by linear interpolation in log σ (k-diffusion's DiscreteSchedule)."""
        log_sigma = sigma.to(self.log_sigmas).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.bucketize(log_sigma.reshape(-1), self.log_sigmas).clamp(1, self.num_timesteps - 1)
        low = high - 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo).clamp(min=torch.finfo(hi.dtype).tiny)).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at continuous t in [0, T−1], interpolating log σ linearly (exact at integer t)."""
        t = t.to(self.log_sigmas).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """VP coefficients (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) at integer timesteps t, exact (no clamping)."""
        return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ/(1 − ᾱ): exact at integer t (0 at a zero-SNR end), 1/σ(t)² otherwise."""
        if t.dtype.is_floating_point:
            return self.t_to_sigma(t) ** -2
        alphas_cumprod = self.alphas_cumprod[t]
        return alphas_cumprod / (1 - alphas_cumprod)
