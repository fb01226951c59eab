"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (order 2, final σ = 0) on the same σ ladder with
an exact denoiser: with ``first_order_penultimate=False`` the samples agree; by default only the step into the
smallest σ > 0 differs (first order here, second order there), which the docstring and README describe."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.sampling import sample_dpmpp_2m
from ldm.eval.gaussian import CHANNELS, ideal_x0

diffusers = pytest.importorskip("diffusers")

STEPS = 8


def diffusers_samples(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusers' final samples, its σ ladder) from VE noise·σ_max, with the exact ε of the Gaussian data."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", solver_order=2,
        algorithm_type="dpmsolver++", use_karras_sigmas=True, final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.double()
    x = (noise * sigmas[0] / (1 + sigmas[0] ** 2).sqrt()).double()  # VP: x_ve / sqrt(1 + σ²)
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        x_ve = x * (1 + sigma ** 2).sqrt()
        eps = (x_ve - ideal_x0(x_ve, sigma.expand(len(x)).double())) / sigma  # the exact ε
        x = scheduler.step(eps, t, x).prev_sample.double()
    return x, sigmas


@pytest.mark.parametrize("penultimate_first_order", [False, True])
def test_dpmpp_2m_matches_diffusers_but_for_the_penultimate_step(penultimate_first_order):
    noise = torch.randn(64, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    theirs, sigmas = diffusers_samples(noise)

    def denoiser(x, sigma):
        return ideal_x0(x, sigma)

    ours = sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, first_order_penultimate=penultimate_first_order)
    difference = (ours - theirs).abs().max().item()
    if penultimate_first_order:
        assert difference > 1e-3  # the one step taken otherwise shows
    else:
        assert difference < 1e-5
