"""Noise schedules: the ``Schedule`` interface every family of noise paths implements, and LDM's discrete VP one.

A schedule is a family of paths x_t = α·x0 + σ_t·ε indexed by one noise level, the VE σ = σ_t/α of
Karras et al. (2022): x_t/α = x0 + σ·ε. Samplers, the training objective and guidance state the noise level
as σ and nothing else; ``alpha_sigma(σ)`` gives the path's (α, σ_t), ``timestep(σ)`` what the network is told,
``sample_sigmas`` how training draws noise levels and ``ladder(steps, spacing)`` a sampling ladder. A new
family of paths is one new subclass (and a config naming it).

``VPSchedule``: betas → ᾱ_t → σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), continuous σ ↔ t, as latent-diffusion / SD.

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

Zero terminal SNR (Lin et al. 2023, Algorithm 1) gives ᾱ_T = 0 and so σ_T = ∞. The σ table clamps ᾱ_T
to ``ZERO_SNR_ALPHA_CUMPROD`` = 2⁻²⁴ (diffusers' choice for its Euler / DPM schedulers), so σ_max ≈ 4096
stays finite; training draws its noise levels from the same table (at t = T − 1 the v-target is
−x0 + 2⁻¹²·ε instead of exactly −x0). Use the ``trailing`` spacing (or ``karras``) so sampling starts at t = T − 1,
and a v-model: an ε-model's x0 = (x_t − σ·ε̂)/α divides by α ≈ 2⁻¹² there. The first step of a
``trailing`` ladder then spans σ ≈ 4096 → ~15, which first-order samplers (DDIM, Euler) take exactly
for a Gaussian but second-order ones (Heun, DPM++ 2M) do not: pair those with ``karras``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from ldm.diffusion.spacing import (
    DEFAULT_SPACING,
    KARRAS_RHO,
    SD_STEPS_OFFSET,
    SPACINGS,
    Spacing,
    get_timesteps,
    karras_sigmas,
)

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


class Schedule(nn.Module, ABC):
    """A family of noise paths x_t = α·x0 + σ_t·ε, indexed by the VE noise level σ = σ_t/α (module docstring).

    An ``nn.Module`` so that its tables move with the model; it holds no parameters and, by convention,
    no persistent buffers (a schedule is derived from its config, never loaded from a checkpoint).
    """

    @abstractmethod
    def alpha_sigma(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(α, σ_t) of the path at VE noise levels ``sigma``: the network sees x_t = α·(x0 + σ·ε)."""

    @abstractmethod
    def timestep(self, sigma: Tensor) -> Tensor:
        """The time input the network was trained with, at noise levels ``sigma``."""

    @abstractmethod
    def sigma_at(self, timestep: Tensor) -> Tensor:
        """The noise level of a network time input (inverse of ``timestep``)."""

    @abstractmethod
    def sample_sigmas(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        """(n,) noise levels drawn as training draws them."""

    @abstractmethod
    def ladder(self, steps: int, spacing: str) -> Tensor:
        """A sampling ladder: (steps + 1,) descending σ ending with 0."""

    @property
    @abstractmethod
    def sigma_min(self) -> Tensor:
        """The smallest positive noise level of the family."""

    @property
    @abstractmethod
    def sigma_max(self) -> Tensor:
        """The noise level sampling starts from."""

    def ode_coordinates(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, u): the state y = scale·x and time u in which multi-evaluation samplers (Heun) take their steps,
        with dy/du = (y − D)/u. VE by default: (1, σ)."""
        return torch.ones_like(sigma), sigma

    def default_spacing(self, sampler: str) -> str:
        """The ladder ``sampler`` walks unless told otherwise (``ldm.diffusion.spacing.DEFAULT_SPACING``)."""
        return DEFAULT_SPACING[sampler]

    def start_scale(self, sigma: Tensor) -> Tensor:
        """What unit noise is multiplied by to start a ladder at ``sigma``: σ itself (k-diffusion)."""
        return sigma

    def snr(self, sigma: Tensor) -> Tensor:
        """Signal-to-noise ratio α²/σ_t² = 1/σ² of every path family."""
        return sigma.double().pow(-2).to(sigma.dtype)


class VPSchedule(Schedule):
    """A discrete VP schedule: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, t = 0 … T−1, with its σ table.

    Buffers (float32, non-persistent: derived from the config, so they never clutter a state dict) use
    latent-diffusion's names: ``betas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``; plus ``sigmas`` (k-diffusion's VE noise levels, increasing in t)
    and ``log_sigmas``. Training draws t uniformly from {0, …, T−1}, i.e. σ from the table.

    ``spacing`` makes one timestep spacing every sampler's default (but those named ``…karras``), as a diffusers
    scheduler config does (SDXL's: ``leading``). ``vp_start`` starts sampling from unit noise as a VP sample
    x_T, i.e. VE x = noise · sqrt(1 + σ_max²) (generative-models' and diffusers' Euler with leading spacing), not
    noise · σ_max.
    """

    def __init__(
        self,
        kind: BetaKind = "linear",
        num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
        linear_start: float = SD_LINEAR_START,
        linear_end: float = SD_LINEAR_END,
        cosine_s: float = COSINE_S,
        zero_terminal_snr: bool = False,
        spacing: Spacing | None = None,
        vp_start: bool = False,
    ) -> None:
        super().__init__()
        if spacing is not None and spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        self.spacing, self.vp_start = spacing, vp_start
        betas = make_betas(kind, num_timesteps, linear_start, linear_end, cosine_s)
        self._set_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    @classmethod
    def from_betas(cls, betas: Tensor) -> VPSchedule:
        """A schedule from explicit betas (e.g. a checkpoint's ``betas`` buffer)."""
        schedule = cls.__new__(cls)
        nn.Module.__init__(schedule)
        schedule.spacing, schedule.vp_start = None, False
        schedule._set_betas(betas.double())
        return schedule

    def _set_betas(self, betas: Tensor) -> None:
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64
        clamped = alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_CUMPROD)  # finite σ_max under zero terminal SNR
        sigmas = ((1 - clamped) / clamped).sqrt().float()
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

    def default_spacing(self, sampler: str) -> str:
        """The configured ``spacing`` (not for a sampler named ``…karras``), else the sampler's own default."""
        if self.spacing is not None and not sampler.endswith("karras"):
            return self.spacing
        return super().default_spacing(sampler)

    def start_scale(self, sigma: Tensor) -> Tensor:
        """σ, or with ``vp_start`` sqrt(1 + σ²): unit noise as the VP sample x_T seen in VE coordinates."""
        return (1 + sigma**2).sqrt() if self.vp_start else sigma

    def alpha_sigma(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """VP coefficients of VE σ: α = (1 + σ²)^-½ (i.e. ᾱ = 1/(1 + σ²)) and σ_t = σ·α."""
        alpha = (1 + sigma**2).rsqrt()
        return alpha, sigma * alpha

    def timestep(self, sigma: Tensor) -> Tensor:
        """The continuous timestep t of σ; exactly the integer t at a σ read off the table (training, DDPM)."""
        t = self.sigma_to_t(sigma)
        nearest = t.round()
        on_table = self.sigmas[nearest.long()] == sigma.to(self.sigmas)
        return torch.where(on_table, nearest, t)

    def sigma_at(self, timestep: Tensor) -> Tensor:
        """σ at a (continuous) timestep."""
        return self.t_to_sigma(timestep)

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        """σ at n timesteps drawn uniformly from {0, …, T−1} (DDPM, Algorithm 1)."""
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)  # (n,)
        return self.sigmas.to(t.device)[t]

    def ladder(self, steps: int, spacing: Spacing, steps_offset: int = SD_STEPS_OFFSET,
               rho: float = KARRAS_RHO) -> Tensor:
        """The (steps + 1,) descending σ a sampler visits, ending with 0 (spacings: ``ldm.diffusion.spacing``)."""
        if spacing == "karras":
            sigmas = karras_sigmas(steps, self.sigma_min.item(), self.sigma_max.item(), rho).to(self.sigmas)
        else:
            sigmas = self.sigmas[get_timesteps(self.num_timesteps, steps, spacing, steps_offset).to(self.sigmas.device)]
        return torch.cat([sigmas, sigmas.new_zeros(1)])

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
