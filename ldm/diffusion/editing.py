"""Editing a known picture: image-to-image (SDEdit, Meng et al. 2022) and inpainting by blending in latent space.

Image-to-image at strength s runs the last ⌊steps·s⌋ steps of the ``steps``-step ladder (diffusers'
``StableDiffusionImg2ImgPipeline.get_timesteps``): the known latents x0 are noised to the first σ of that tail,
x = x0 + σ·ε in VE form (α·x0 + σ_t·ε on the model's own path: DDPM's q(x_t | x0) for VP models, the straight
line for flow models), and any sampler continues from there. Strength 1 is text-to-image (pure noise on the full
ladder, as diffusers' inpainting pipeline starts at full strength), strength 0 runs no step and returns x0.

Inpainting with any model: wherever ``keep`` is 1 the denoiser sees the known latents re-noised to its σ with
the image's own noise, x = x0 + σ·ε, and its estimate there is replaced by x0. Every sampler step is a
combination of x and the estimates, so the kept region stays exactly on x0's noising path (the same noise at
each level, as diffusers' legacy inpainting re-noises with its initial noise) and ends at x0; the repainted
region is denoised seeing the known one at every level (RePaint's conditioning, without resampling).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ldm.diffusion.denoiser import append_dims, batch_sigma

GuidedFn = Callable[[Tensor, Tensor], Tensor]  # denoiser(x, σ) → x0 with conditioning closed over


def first_step(steps: int, strength: float) -> int:
    """Index of the first ladder step image-to-image runs at ``strength`` (diffusers' ``get_timesteps``)."""
    run = min(int(steps * strength), steps)
    return max(steps - run, 0)


def start_point(sigmas: Tensor, noise: Tensor, steps: int, init: Tensor | None = None,
                strength: float = 1.0, start_scale: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(the ladder to walk, the VE starting point): ``noise``·σ_max from the top (``start_scale(σ_max)`` when the
    schedule says so, e.g. SDXL's √(1+σ²)), or ``init`` noised to the tail's σ."""
    start = 0 if init is None else first_step(steps, strength)
    sigmas = sigmas[start:]
    if start == 0:
        scale = start_scale(sigmas[0]) if start_scale is not None else sigmas[0]
        return sigmas, noise * scale  # (B, C, h, w): text-to-image
    return sigmas, init + noise * sigmas[0]  # x0 + σ·ε


def keep_known(denoiser: GuidedFn, known: Tensor, keep: Tensor, noise: Tensor) -> GuidedFn:
    """A denoiser that holds the ``keep`` region (1 = keep, (1 or B, 1, h, w)) at the known latents (B, C, h, w)."""

    def inpainted(x: Tensor, sigma: Tensor) -> Tensor:
        s = append_dims(batch_sigma(sigma, x), x.ndim)  # (B, 1, 1, 1)
        x = keep * (known + s * noise) + (1 - keep) * x  # the known region re-noised to this level
        return keep * known + (1 - keep) * denoiser(x, sigma)

    return inpainted


def blend_known(x: Tensor, known: Tensor, keep: Tensor) -> Tensor:
    """The final latents: the known ones wherever ``keep`` is 1."""
    return keep * known + (1 - keep) * x
