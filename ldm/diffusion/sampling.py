"""Samplers as plain functions over one VE denoiser ``D(x, σ) → x0`` (x = x0 + σ·ε; cf. k-diffusion).

Each sampler is ``fn(denoiser, x, sigmas, *, generator=None, callback=None, progress=False, **options)``:
``x`` is the initial noise already scaled by ``sigmas[0]``, ``sigmas`` a (n+1,) descending σ ladder
ending with 0 (``schedule.ladder``), conditioning is closed over by the caller (``cfg_denoiser``), noise is
drawn from ``generator`` only (same seed → same samples), and the caller's ``x`` is never modified.
``callback`` receives ``{"x", "i", "sigma", "sigma_next", "denoised"}`` once per step.

Known equivalences, checked by the tests: DDIM(η=0) ≡ Euler, and DDPM ≡ DDIM(η=1) ≡ Euler-ancestral(η=1)
in σ-space (Karras et al. 2022, §3; Song et al. 2021, §4.3); they differ by their default spacing.
Final step: all samplers step to σ = 0 and return the denoised sample; LDM's DDIM stops at ᾱ_0 instead.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import trange

from ldm.diffusion.classifier_guidance import ClassifierGuidance
from ldm.diffusion.denoiser import Denoiser, DenoiserFn
from ldm.diffusion.editing import blend_known, keep_known, start_point
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.schedule import Schedule
from ldm.diffusion.spacing import DEFAULT_SPACING  # noqa: F401  (re-exported)

Sampler = Callable[..., Tensor]
Callback = Callable[[dict], None]
Coordinates = Callable[[Tensor], tuple[Tensor, Tensor]]  # σ → (scale, u) of a schedule's ODE coordinates


def ve_coordinates(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """The VE state and σ itself (k-diffusion's choice for every sampler)."""
    return torch.ones_like(sigma), sigma


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _report(callback: Callback | None, x: Tensor, i: int, sigmas: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up) of an ancestral step: move to σ_down, then add σ_up noise (σ_down² + σ_up² = σ_to²)."""
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt())
    return (sigma_to**2 - sigma_up**2).sqrt(), sigma_up


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, eq. 3; Algorithm 1, 1st order)."""
    sigmas = sigmas.to(x.device)
    s_in = sigmas.new_ones(x.shape[0])  # σ stays float32 under half-precision x
    for i in trange(len(sigmas) - 1, disable=not progress):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas, denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler step down to σ_down, then fresh noise σ_up (k-diffusion's ancestral sampler; η=1 is the DDPM posterior)."""
    sigmas = sigmas.to(x.device)
    s_in = sigmas.new_ones(x.shape[0])  # σ stays float32 under half-precision x
    for i in trange(len(sigmas) - 1, disable=not progress):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if eta:
            x = x + _noise(x, generator) * (sigma_up * s_noise)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    coordinates: Coordinates = ve_coordinates,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1); Euler on the last step.

    The trapezoid is taken in the schedule's ODE coordinates y = scale·x, u (``Schedule.ode_coordinates``), where
    dy/du = (y − D)/u: the VE state and σ for VP models (k-diffusion's Heun), the flow state x_t and t for rectified
    flow (diffusers' FlowMatchHeunDiscreteScheduler). Euler steps are the same in either.
    """
    sigmas = sigmas.to(x.device)
    s_in = sigmas.new_ones(x.shape[0])  # σ stays float32 under half-precision x
    for i in trange(len(sigmas) - 1, disable=not progress):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas, denoised)
        if sigmas[i + 1] == 0:
            x = denoised  # Euler to σ = 0
            continue
        (scale, u), (scale_next, u_next) = coordinates(sigmas[i]), coordinates(sigmas[i + 1])
        y = x * scale
        d = (y - denoised) / u
        y_euler = y + d * (u_next - u)
        d_next = (y_euler - denoiser(y_euler / scale_next, sigmas[i + 1] * s_in)) / u_next
        x = (y + (d + d_next) / 2 * (u_next - u)) / scale_next
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with σ_t(η) of eq. 16), written with ᾱ = 1/(1 + σ²) on the VE state."""
    sigmas = sigmas.to(x.device)
    s_in = sigmas.new_ones(x.shape[0])  # σ stays float32 under half-precision x
    for i in trange(len(sigmas) - 1, disable=not progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        _report(callback, x, i, sigmas, denoised)
        alpha_next = 1 / (1 + sigma_next**2)  # ᾱ_{t-1}
        one_minus_alpha, one_minus_alpha_next = sigma**2 / (1 + sigma**2), sigma_next**2 / (1 + sigma_next**2)
        one_minus_ratio = (sigma**2 - sigma_next**2) / (1 + sigma**2)  # 1 − ᾱ_t/ᾱ_{t-1}
        std = eta * (one_minus_alpha_next / one_minus_alpha * one_minus_ratio).sqrt()  # eq. 16
        eps = (x - denoised) / sigma
        x_prev = alpha_next.sqrt() * denoised + (one_minus_alpha_next - std**2).clamp(min=0).sqrt() * eps
        if eta:
            x_prev = x_prev + std * _noise(x, generator)
        x = x_prev / alpha_next.sqrt()  # VP x_{t-1} → VE
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x̂0) (Ho et al. 2020, eq. 6–7) in VE form.

    With r = σ_s²/σ_t²: mean = x̂0 + r·(x_t − x̂0), std = σ_s·sqrt(1 − r), i.e. the posterior variance β̃_t
    (LDM's and diffusers' "fixed_small"). Over every training step (1000 steps, ``trailing``) this is DDPM's
    Algorithm 2; over fewer steps it is the same posterior between the visited timesteps.
    """
    sigmas = sigmas.to(x.device)
    s_in = sigmas.new_ones(x.shape[0])  # σ stays float32 under half-precision x
    for i in trange(len(sigmas) - 1, disable=not progress):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas, denoised)
        r = (sigmas[i + 1] / sigmas[i]) ** 2
        x = denoised + r * (x - denoised) + sigmas[i + 1] * (1 - r).sqrt() * _noise(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    first_order_penultimate: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with λ = −log σ.

    First order on the first step and on the last two: into the smallest σ > 0, then to σ = 0 (x = the last
    denoised). diffusers' ``DPMSolverMultistepScheduler`` (``solver_order=2``, ``final_sigmas_type="zero"``) lowers
    only the step to σ = 0; its ``lower_order_final`` lowers nothing more at order 2. The step into the smallest
    σ > 0 is first order here too because it is long in λ and the second-order extrapolation overshoots there: on
    exact Gaussian data (scripts/sampler_moments.py, SD's ε schedule, Karras ladder) the second-order step made the
    samples' std 5-7 % too wide at 8-10 steps against 0-4 % here; at 20 steps both are within 1.3 %.
    ``first_order_penultimate=False`` takes diffusers' steps (tests/diffusion/test_samplers.py checks it against theirs).
    """
    sigmas = sigmas.to(x.device)
    s_in = sigmas.new_ones(x.shape[0])  # σ stays float32 under half-precision x
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=not progress):
        denoised = denoiser(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()  # λ_{i+1} − λ_i
        final = first_order_penultimate and sigmas[i + 2] == 0  # the step into the smallest σ > 0
        d = denoised if old_denoised is None or final else denoised + (denoised - old_denoised) * (h / (2 * h_last))
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
}
FEW_STEPS = 8  # at this many steps or fewer, default_sampler is DDIM


def default_sampler(steps: int) -> str:
    """The sampler a command line uses when none is named: DPM-Solver++(2M), or DDIM at ``FEW_STEPS`` steps or
    fewer, where DPM-Solver++(2M)'s Karras ladder read 31 % / 18 % prompt adherence at 4 steps on the shapes ε / v
    models and DDIM 98 % / 96 % (at 8: 96 % / 99 % against 100 % / 100 %; README, "Flow matching")."""
    return "ddim" if steps <= FEW_STEPS else "dpmpp_2m"


class SampleResult(NamedTuple):
    """Samples x0 (B, C, H, W), the number of denoiser evaluations, and the σ ladder used."""

    x: Tensor
    nfe: int
    sigmas: Tensor


def sample(
    name: str,
    denoiser: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    schedule: Schedule,
    steps: int,
    spacing: str | None = None,
    generator: torch.Generator | None = None,
    *,
    callback: Callback | None = None,
    progress: bool = False,
    init: Tensor | None = None,
    strength: float = 1.0,
    keep: Tensor | None = None,
    **opts,
) -> SampleResult:
    """Run sampler ``name`` from unit Gaussian ``noise`` for ``steps`` steps; count denoiser calls (NFE).

    With ``init`` (known latents (B, C, h, w)) only the ladder's last ⌊steps·strength⌋ steps run, from ``init``
    noised to their first σ (image-to-image); with ``keep`` too ((1 or B, 1, h, w), 1 = keep) that region stays
    ``init`` (inpainting). ``ldm.diffusion.editing`` defines both.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    ladder = schedule.ladder(steps, spacing or schedule.default_spacing(name)).to(noise.device)
    sigmas, start = start_point(ladder, noise, steps, init, strength, schedule.start_scale)
    if keep is not None:
        denoiser = keep_known(denoiser, init, keep, noise)
    if "coordinates" in inspect.signature(SAMPLERS[name]).parameters:
        opts.setdefault("coordinates", schedule.ode_coordinates)
    nfe = 0

    def counted(x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return denoiser(x, sigma)

    x = SAMPLERS[name](counted, start, sigmas, generator=generator, callback=callback, progress=progress, **opts)
    return SampleResult(x if keep is None else blend_known(x, init, keep), nfe, sigmas)


def sample_latents(
    denoiser: Denoiser,
    noise: Tensor,
    cond: dict,
    uncond: dict | None = None,
    *,
    sampler: str,
    steps: int,
    guidance: float = 1.0,
    guidance_rescale: float = 0.0,
    spacing: str | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    classifier_guidance: ClassifierGuidance | None = None,
    init: Tensor | None = None,
    strength: float = 1.0,
    keep: Tensor | None = None,
    **options,
) -> SampleResult:
    """The one sampling core: classifier-free guidance of ``guidance`` around ``denoiser`` (and classifier guidance
    around that, when given), then ``sampler``.

    ``noise`` (B, C, h, w) is unit Gaussian; ``cond`` / ``uncond`` are the network's conditioning keywords
    (``uncond`` is unused at guidance 1). Every caller (Pipeline, training sample grids through it, ControlNet,
    evaluation, the benchmark) samples through here. ``init``, ``strength`` and ``keep`` edit known latents
    (image-to-image, inpainting: ``sample``).
    """
    guided = cfg_denoiser(denoiser, cond, uncond or {}, guidance, guidance_rescale)
    if classifier_guidance is not None:
        guided = classifier_guidance.wrap(guided)
    return sample(sampler, guided, noise, denoiser.schedule, steps, spacing, generator, callback=callback,
                  progress=progress, init=init, strength=strength, keep=keep, **options)
